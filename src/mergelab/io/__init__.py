"""Checkpoint readers and the streaming, atomic safetensors writer. No merge method lives here."""

from mergelab.io.readers import CheckpointReader, TensorMeta, open_checkpoint
from mergelab.io.writer import ShardPlan, StreamingSafetensorsWriter, parse_size

__all__ = ["CheckpointReader", "ShardPlan", "StreamingSafetensorsWriter", "TensorMeta", "open_checkpoint",
           "parse_size"]
