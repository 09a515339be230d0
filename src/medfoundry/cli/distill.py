"""``medfoundry distill``: pre-training with the ``distill`` method and a frozen teacher (docs/distillation.md).

A thin layer over ``medfoundry pretrain``: the same recipe, overrides, budgets, resume and output folder
(``<output>/pretrain/encoder``, an ordinary checkpoint folder), with ``pretrain.method=distill`` and the teacher.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from medfoundry.cli.common import ConfigArg, OutputOpt, OverridesOpt, ReaderOptionsLongOpt
from medfoundry.cli.pretrain import ThreadsOpt, pretrain


def distill_overrides(teacher: str, student: str | None, teacher_img_size: int | None) -> list[str]:
    """The command's own options as dotted overrides (placed before ``-s``, so those still win)."""
    # Quoted: "public:NAME:PATH" would otherwise be read as a YAML mapping.
    values = [f"pretrain.distill.teacher={json.dumps(teacher)}"]
    if student is not None:
        values.append(f"model.backbone={json.dumps(student)}")
    if teacher_img_size is not None:
        values.append(f"pretrain.distill.teacher_img_size={teacher_img_size}")
    return values


def distill(
    teacher: Annotated[
        str,
        typer.Option(
            "--teacher", "-t", help="the frozen teacher: a checkpoint folder, a preset or timm name, public:NAME:PATH"
        ),
    ],
    config: ConfigArg = None,
    overrides: OverridesOpt = None,
    output: OutputOpt = None,
    student: Annotated[
        str | None, typer.Option("--student", help="the student backbone (model.backbone), e.g. vit_tiny_64")
    ] = None,
    teacher_img_size: Annotated[
        int | None, typer.Option("--teacher-img-size", min=1, help="the teacher's input size, if not its own")
    ] = None,
    data: Annotated[
        str | None, typer.Option("--data", "-d", help="dataset spec of the unlabeled images (data.source)")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="continue from the last checkpoint")] = True,
    domain: Annotated[
        str | None, typer.Option("--domain", help="view preset: natural, pathology, radiology, ophthalmology or oct")
    ] = None,
    reader_options: ReaderOptionsLongOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Distil a frozen teacher into a student on unlabeled images; writes <output>/pretrain/encoder.

    The recipe (e.g. configs/pretrain/distill.yaml) gives the student, views and budget; -s overrides win.
    """
    values = [*distill_overrides(teacher, student, teacher_img_size), *(overrides or [])]
    pretrain(
        config=config,
        overrides=values,
        output=output,
        resume=resume,
        domain=domain,
        stop_on_collapse=False,
        method="distill",
        data=data,
        reader_options=reader_options,
        threads=threads,
    )


def register(root: typer.Typer) -> None:
    root.command("distill")(distill)
