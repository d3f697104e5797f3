"""Export a SlimBench model to formats other tools load, each with a manifest of what was exact.

- ``gguf_export``: GGUF for llama.cpp (F32/F16/BF16; Q8_0/Q4_0/Q4_1 from a method's own grid
  where it fits the block format, else re-quantized and said so).
- ``compressed_tensors``: Hugging Face safetensors + ``quantization_config`` in the
  compressed-tensors format (transformers, vLLM and llm-compressor load it).
- ``openvino_ir``: OpenVINO IR (``openvino.convert_model``).
- ``grid``: the integer grid of a quantized weight, and the measured change of an export.
- ``manifest``: the JSON written beside every export.
"""
