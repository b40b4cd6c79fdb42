"""memllm package."""
