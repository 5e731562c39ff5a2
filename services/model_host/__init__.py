"""The model host: ONNX Runtime sessions for the fleet (data plane) and their
lifecycle within a memory budget (control plane)."""
