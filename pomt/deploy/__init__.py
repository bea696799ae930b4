"""Where and how a pruned model runs: export to ONNX/OpenVINO (``export``) and timing in the
runtimes it is deployed with (``runtimes``)."""
