"""Where a student's segments fall on the teacher's recorded steps."""

from __future__ import annotations


def segment_step_indices(total_steps: int, nfe: int) -> list[int]:
    """Indices into a ``total_steps`` schedule where ``nfe`` equal raw-time segments begin and end.

    Raises ``ValueError`` when the boundaries do not fall on recorded steps (for example NFE=3 on
    a 50-step schedule), because the offline loss needs whole recorded sub-steps per segment.
    """
    if nfe < 1:
        raise ValueError(f"NFE must be >= 1, got {nfe}")
    if total_steps % nfe:
        raise ValueError(
            f"NFE={nfe} does not divide the {total_steps} recorded steps; "
            f"choose an NFE that divides {total_steps}"
        )
    return [i * total_steps // nfe for i in range(nfe + 1)]
