"""Quantization stages: int8 PTQ (torch.ao), GPTQ and round-to-nearest (gptqmodel), bitsandbytes, GGUF."""
