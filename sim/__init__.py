"""Closed-loop simulation: MetaWorld demonstrations, the NORA-architecture policy trained on them, and the
evaluation harness that runs any bundle or checkpoint in closed loop (``nora-edge eval``).

Imported as ``nora_edge.sim``. MetaWorld and MuJoCo are an optional extra (``pip install 'nora-edge[sim]'``);
training imports torch, evaluating a bundle does not.
"""
