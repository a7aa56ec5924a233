"""``eagle3-mlx train``: EAGLE-3 head training in MLX (data generation by the
target, draft vocabulary, cached target features, training-time test, export).

Stages live in their own modules: :mod:`.data`, :mod:`.vocab`, :mod:`.features`,
:mod:`.ttt`, :mod:`.trainer`, :mod:`.export`, :mod:`.evaluate`; :mod:`.cli`
wires them into one resumable command.
"""
