"""Loading, rewriting and saving a saved PIR program (``paddle.jit.save`` JSON), and small matchers over its
values, shared by the graph rewrites of ``cpu_graph.py`` and ``kernel_fusions.py``."""
from pathlib import Path
from typing import Callable, Optional

import paddle

__all__ = ["rewrite_program", "replace_matches", "erase_dead_ops", "producer", "only_user", "has_one_user",
           "constant", "int_list", "is_float32", "same_shape", "KEPT_OPS"]

KEPT_OPS = ("builtin.parameter", "builtin.constant", "pd_op.data", "builtin.shadow_output", "pd_op.fetch")


def rewrite_program(model_file: Path, rewrite: Callable) -> int:
    """Load the PIR JSON ``model_file``, apply ``rewrite(program) -> count`` under its program guard, drop ops
    left without users, save it back. Returns the count (0, file untouched, for a program that is not JSON)."""
    model_file = Path(model_file)
    if model_file.suffix != ".json":
        return 0
    was_dynamic = paddle.in_dynamic_mode()
    paddle.enable_static()
    try:
        program = paddle.static.Program()
        paddle.base.core.deserialize_pir_program(str(model_file), program)
        with paddle.static.program_guard(program):
            count = rewrite(program)
        if count:
            erase_dead_ops(program)
            paddle.base.core.serialize_pir_program(program, str(model_file), True, False, True)
    finally:
        if was_dynamic:
            paddle.disable_static()
    return count


def replace_matches(model_file: Path, match: Callable, build: Callable) -> int:
    """For every op of ``model_file`` where ``match(op)`` gives ``(last_op, args)``: insert ``build(*args)`` just
    before ``last_op`` and hand it the readers of ``last_op``'s first result (the matched ops then die and are
    erased). Returns the number of replacements (see :func:`rewrite_program`)."""

    def rewrite(program):
        replaced = 0
        for op in list(program.global_block().ops):
            found = match(op)
            if found is None:
                continue
            last_op, args = found
            paddle.pir.set_insertion_point(last_op)
            last_op.result(0).replace_all_uses_with(build(*args))
            replaced += 1
        return replaced

    return rewrite_program(model_file, rewrite)


def erase_dead_ops(program) -> None:
    """Remove ops whose results are all unused (repeatedly, last op first); graph inputs, parameters and
    outputs stay."""
    block = program.global_block()
    changed = True
    while changed:
        changed = False
        for op in reversed(list(block.ops)):
            if op.name() in KEPT_OPS or not op.num_results():
                continue
            if all(op.result(index).use_empty() for index in range(op.num_results())):
                op.erase()
                changed = True


def producer(value, *names: str):
    """The op defining ``value`` when its name is one of ``names``, else None."""
    op = value.get_defining_op()
    return op if op is not None and op.name() in names else None


def only_user(value, name: str):
    """The single op reading ``value`` when it is a ``name`` op, else None."""
    users = value.all_used_ops()
    return users[0] if len(users) == 1 and users[0].name() == name else None


def has_one_user(value) -> bool:
    return len(value.all_used_ops()) == 1


def constant(value) -> Optional[float]:
    """The number held by a one-element ``pd_op.full`` ``value``, else None."""
    op = producer(value, "pd_op.full")
    return None if op is None else float(op.attrs()["value"])


def int_list(value) -> Optional[list]:
    """The integers of a ``pd_op.full_int_array`` ``value``, else None."""
    op = producer(value, "pd_op.full_int_array")
    return None if op is None else [int(v) for v in op.attrs()["value"]]


def is_float32(*values) -> bool:
    return all(value.dtype == paddle.float32 for value in values)


def same_shape(a, b) -> bool:
    return list(a) == list(b)
