"""fedsens methods as Flower apps: the same Method hooks, driven by Flower's ServerApp and ClientApp.

Nothing here is imported by the rest of fedsens, and this package's own modules import `flwr` only
when a Flower engine or app is actually used, so fedsens works without the `flower` extra.

- `records`: tensors <-> Flower ArrayRecords, a RunConfig <-> Flower's run config.
- `client`: the ClientApp (local tensors and per-client state live in the node's `Context.state`).
- `server`: the strategy (seeded sampling, aggregation of the shared tensors by name) and the ServerApp
  that writes the usual run folder.
- `engine`: `fedsens train --engine flower` on Flower's simulation engine.
- `project`: `fedsens flower app DIR`, a Flower app project for `flwr run` against a SuperLink.
"""
