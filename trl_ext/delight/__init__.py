from .config import DelightConfig
from .delight import delight_weights, sequence_delight, surprisal, token_delight
from .gate import GATE_RULES, KondoGate, gate_decisions, quantile_price
from .gated import KondoGateArguments, KondoGateMixin
from .packing import concat_rows, pack_survivors, take_rows
from .trainer import DelightTrainer

__all__ = [
    "GATE_RULES",
    "DelightConfig",
    "DelightTrainer",
    "KondoGate",
    "KondoGateArguments",
    "KondoGateMixin",
    "concat_rows",
    "delight_weights",
    "gate_decisions",
    "pack_survivors",
    "quantile_price",
    "sequence_delight",
    "surprisal",
    "take_rows",
    "token_delight",
]
