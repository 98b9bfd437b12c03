"""Pure-PyTorch implementations: any device, float64 capable; they define correctness."""
