"""The pieces of a federated run that every engine shares, as public typed functions.

- `tensors`: a model's tensors by name; copies and loads of them.
- `context`: the device, the dataset, the partition and the model of a run (`build_context`).
- `state`: where a run stands (`RunState`): fresh, resumed from its checkpoint, checkpointed.
- `rounds`: client sampling, one round of training and its aggregation (`train_round`).
- `together`: a round's participants trained together, K at a time (`client_batch`).
- `protocols`: evaluation under both protocols (after-aggregation, paper).
- `tables`: the rows of metrics.csv and rounds.csv, the table writer and the summary.

`federation.run` (the built-in loop), the Flower ServerApp and ClientApp, the benchmark and the probe
call these same functions, so a result never depends on the engine that produced it. The package
imports no submodule here: each caller imports what it uses.
"""
