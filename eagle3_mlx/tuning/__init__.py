"""Per-machine draft-tree tuning (``eagle3-mlx calibrate`` and ``--tree auto``).

The speed of one speculative step is

    tokens/s = E[tau](tree) / (t_draft(top_k, depth) + t_verify(T) + t_overhead)

Costs are measured on this machine with this model, quantization and mlx
version; acceptance once per (target, head); the best tree follows. One job a
module, dependencies pointing down the table (the first three import no MLX):

| module          | job                                                          |
|-----------------|--------------------------------------------------------------|
| ``costs``       | cost model and the fits that build it (pure)                 |
| ``acceptance``  | acceptance model: expected tau of any tree shape (pure)      |
| ``optimise``    | best tree for a cost and an acceptance model (pure)          |
| ``measure``     | timing the engine's own steps, recording draft ranks (MLX)   |
| ``cache``       | calibrations on disk, keyed by target, head and machine      |
| ``tuner``       | online tuner: live acceptance re-picks the tree              |
| ``choose``      | ``--tree`` value to the engine's tree (calibrating once)     |
| ``report``      | ``eagle3-mlx calibrate``: the report and the command         |

Import from the modules themselves; this package re-exports nothing.
"""
