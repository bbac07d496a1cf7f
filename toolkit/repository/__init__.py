"""The Triton model repository format: the one interface the build, the generation model and the gateway share.

The tensor contract, ``config.pbtxt`` writing and reading, the manifest, the layout, the writer,
the TensorRT profile and build script, and the plan compatibility check. Nothing here imports the
build stages or the serving runtime.
"""
