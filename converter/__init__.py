"""The converter library: quantizes `.safetensors` checkpoints layer by layer. Never imports ComfyUI."""
