"""moefy: turn a dense llama-family model into a Mixture-of-Experts checkpoint (see build.py)."""
