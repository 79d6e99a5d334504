"""Dense PyTorch implementations: the oracle every fast kernel is checked against."""
