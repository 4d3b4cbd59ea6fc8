"""INT8 calibration (planned): data readers over image folders that feed ``onnxruntime.quantization``
and TensorRT's calibrators. Not implemented yet; ``ram-export --precision`` offers fp32 and fp16."""
