"""The Open Inference Protocol (KServe v2 / Triton) over REST and gRPC, on top of the data plane."""
