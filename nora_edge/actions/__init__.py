"""FAST+ action codec: tokenizer, byte table, constrained-decoding automaton, id mapping.

Data flow: model ids (Qwen) --ActionIdMap--> FAST ids --FastTokenizer.decode / ByteTable.decode_chunk-->
(T, D) normalized actions (unnormalization lives in ``normalize.py``). During generation
``FastAutomaton`` masks the action logits so only decodable sequences can be produced.
"""

from nora_edge.actions.automaton import AutomatonState, FastAutomaton
from nora_edge.actions.bytetable import ByteTable
from nora_edge.actions.dct import dct_basis, dct_ortho, idct_ortho
from nora_edge.actions.fast import FastTokenizer
from nora_edge.actions.ids import ActionIdMap
from nora_edge.actions.result import DecodeResult

__all__ = [
    "ActionIdMap",
    "AutomatonState",
    "ByteTable",
    "DecodeResult",
    "FastAutomaton",
    "FastTokenizer",
    "dct_basis",
    "dct_ortho",
    "idct_ortho",
]
