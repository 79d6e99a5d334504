"""Attention ops: masks as pure functions, the dense ``reference`` backend (CPU oracle), and a dispatcher."""
