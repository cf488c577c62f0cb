"""Pieces every Vespid process shares: protocol models, broker topology, transport, errors."""

PROTOCOL_VERSION = 1
