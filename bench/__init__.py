"""ember.bench: ember's kernels and training steps measured against stock PyTorch and peers.

- ``suites``: what is measured, as ``setup(provider, params, device)`` per suite
  (attention, cross_entropy, lora, optimizer, train_step) for ember, torch,
  torch.compile, SDPA backends and installed peers;
- ``harness``: each case in a fresh process (CUDA events and NVML on a GPU,
  memory on a CPU), one JSON file per run (``ember bench``);
- ``report``: markdown tables with ratios and PNG plots (``ember bench report``);
- ``memory``: the largest tensor a computation creates, on any device;
- ``demo``: one LM-head loss through ember and through stock PyTorch (``ember demo``);
- ``optimizer_state``: optimizer state bytes per parameter at SmolLM2-135M's shapes.

The bench imports the kernels and the engine, never the command line.
"""
