"""Reusable blocks shared by the generative models: event tensors, embeddings, HSTU and softmax blocks, heads."""
