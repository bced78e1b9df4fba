"""Model loading, loss and export for SFT of Hugging Face causal LMs."""
