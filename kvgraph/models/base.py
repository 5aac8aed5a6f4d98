"""What every architecture shares: the build-time view of inputs and memories (`BuildIO`) and the
interface the engine uses (`Model`)."""
from __future__ import annotations

from typing import Any, Callable, Mapping

from ..gguf.config import MetadataView, ModelConfig
from ..graph.inputs import GraphInput, OutputRowsInput, PositionInput, TokenInput
from ..graph.ir import GraphBuilder, Tensor
from ..graph.key import GraphKey


class BuildIO:
    """Inputs and memory views for one graph build, created from its key. Records every input it hands
    out, with the object that fills it, so the cache entry can write them before each replay."""

    def __init__(self, g: GraphBuilder, key: GraphKey, memories: Mapping[str, Any]):
        self.g, self.key, self.memories = g, key, memories
        self.inputs: list[tuple[GraphInput, Any]] = []
        self._views: dict[str, Any] = {}
        self.tokens = self._add(TokenInput(g, key.n_tokens)).tensor
        self.pos = self._add(PositionInput(g, key.n_tokens)).tensor
        self._out_rows: OutputRowsInput | None = None

    def _add(self, inp: GraphInput, owner: Any = None) -> GraphInput:
        self.inputs.append((inp, owner))
        return inp

    def memory(self, name: str) -> Any:
        """Memory `name` as this graph sees it (e.g. KVAttention), with its inputs created once."""
        if name not in self._views:
            view = self.memories[name].build(self.g, self.key.n_tokens, self.key.window(name), self.key.n_seqs)
            for inp, owner in view.inputs:
                self._add(inp, owner)
            self._views[name] = view
        return self._views[name]

    def select_outputs(self, x: Tensor) -> Tensor:
        """Keep only the rows whose logits are wanted (skipped when every row is an output)."""
        if self.key.n_outputs == self.key.n_tokens:
            return x
        if self._out_rows is None:
            self._out_rows = OutputRowsInput(self.g, self.key.n_outputs)
            self._add(self._out_rows)
        return self.g.get_rows(x, self._out_rows.tensor)


class Model:
    """An architecture: expected tensors, memories, and the graph of one ubatch."""

    arch: str = ""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.shapes = self.tensor_shapes()

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the file must hold, with its numpy shape."""
        raise NotImplementedError

    optional_tensors: frozenset[str] = frozenset()

    def skipped_tensors(self) -> tuple[str, ...]:
        """Name prefixes of tensors a file may hold that the architecture knowingly leaves out of its graph
        (as llama.cpp skips a multi-token-prediction block unless asked for it); none by default."""
        return ()

    def derived_tensors(self) -> dict[str, tuple[str, int, int]]:
        """Tensors the architecture reads as row ranges of a fused file tensor: name -> (file tensor, first
        row, rows). A name may reuse its source's (Phi-3's ffn_up holds gate and up)."""
        return {}

    def constant_shapes(self) -> dict[str, tuple[int, ...]]:
        """Small tensors the file may hold that are constants of the graph, not weights (llama3's
        rope_freqs.weight): the loader reads them into cfg.extra[name] as float tuples."""
        return {}

    @classmethod
    def read_extra(cls, m: MetadataView) -> dict[str, Any]:
        """Architecture-specific hyper-parameters, stored in ModelConfig.extra."""
        return {}

    @classmethod
    def read_layout(cls, cfg: ModelConfig, tensor_names: frozenset[str]) -> dict[str, Any]:
        """Structure the file says by the tensors it holds rather than by metadata (as llama.cpp's optional
        tensors do: a layer with ffn_gate_inp is a mixture of experts), stored in ModelConfig.extra."""
        return {}

    def create_memories(self, n_ctx: int, n_ubatch: int, alloc: Callable, flash_attn: bool,
                        n_seq_max: int) -> dict[str, Any]:
        """The model's memories: KV caches of n_ctx cells, recurrent states with n_seq_max slots (sequences
        that may be alive at once)."""
        raise NotImplementedError

    def build(self, g: GraphBuilder, io: BuildIO) -> None:
        """Build the graph of one ubatch; must set output 'logits' [n_outputs, n_vocab]."""
        raise NotImplementedError
