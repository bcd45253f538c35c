"""The torch-free runtime: tokenizer, numpy schedulers, pipelines and backend runners."""
