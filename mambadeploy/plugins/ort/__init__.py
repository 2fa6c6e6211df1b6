"""ONNX Runtime custom-op library (C++ sources + build helper) for the mambadeploy ops."""
