"""The TVM backend: Relax module assembly, op lowering, compile pipeline, runtime."""
