"""gRPC front end of the engine: servicers, status-code mapping, interceptors. No model code."""
