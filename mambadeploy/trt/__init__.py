"""TensorRT engine build (profiles, fingerprints, engine directories, the build worker). Floor: beside export/ and
plugins/ — it reads export directories and registers the plugins; runtime/trt_runner.py sits above it."""
