"""A deterministic hard kill at the k-th file write of an action, for every k in turn.

    python -m tests.helpers.kill_writes export CHECKPOINT OUT_DIR

runs `export.export_checkpoint(CHECKPOINT, OUT_DIR)` in a forked child that calls os._exit(9)
just before its k-th write under OUT_DIR's parent, for k = 1, 2, ... until a child finishes
without reaching k, and prints one JSON line per run: {"k", "status", "write" (what the k-th write
was), "out_files" (OUT_DIR's files afterwards, null if it does not exist)}.

A write is a Python open() for writing, a rename (the commit of an atomic directory), and the two
writers that bypass Python's open: safetensors' save_file (model weights) and the tokenizers
library's save (tokenizer.json). The parent only imports; torch runs in the children, so forking is
safe (no thread pool exists yet at the fork).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path


def run_killed_at(k: int, root: Path, action: Callable[[], object]) -> tuple[int, str | None]:
    """Fork and run action, dying with status 9 just before its k-th write under root.

    Returns (exit status, description of the k-th write or None if the action finished first).
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        _install_counter(k, str(root), write_end)
        try:
            action()
        except BaseException as e:  # noqa: BLE001  (a failure, not a kill: report it as status 1)
            os.write(write_end, f"error: {type(e).__name__}: {e}".encode())
            os._exit(1)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        message = f.read().decode() or None
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), message


def _install_counter(k: int, root: str, report_fd: int) -> None:
    count = 0

    def write(what: str, path: object) -> None:
        nonlocal count
        if not os.path.abspath(os.fsdecode(path)).startswith(root + os.sep):
            return
        count += 1
        if count == k:
            os.write(report_fd, f"{what} {os.path.relpath(os.fsdecode(path), root)}".encode())
            os._exit(9)

    def audit(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2]
            writing = any(c in mode for c in "wax+") if mode else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing:
                write("open", args[0])
        elif event == "os.rename":  # os.replace and os.rename
            write("rename", args[0])

    sys.addaudithook(audit)
    import transformers
    import transformers.modeling_utils as modeling_utils

    save_file = modeling_utils.safe_save_file

    def counted_save_file(tensors: object, filename: str, *args: object, **kwargs: object) -> object:
        write("safetensors", filename)
        return save_file(tensors, filename, *args, **kwargs)

    modeling_utils.safe_save_file = counted_save_file
    tokenizer_class = transformers.PreTrainedTokenizerFast
    save_tokenizer = tokenizer_class._save_pretrained

    def counted_tokenizer_save(self, save_directory, file_names, *args, **kwargs):  # noqa: ANN001
        write("tokenizers", os.path.join(save_directory, "tokenizer.json"))
        return save_tokenizer(self, save_directory, file_names, *args, **kwargs)

    tokenizer_class._save_pretrained = counted_tokenizer_save


def _files(path: Path) -> list[str] | None:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else None


def main(argv: list[str]) -> None:
    what, source, out = argv[0], Path(argv[1]), Path(argv[2]).absolute()
    if what != "export":
        raise SystemExit(f"unknown action {what!r}")
    from deploy import export  # imports torch and transformers; runs nothing

    k = 1
    while True:
        status, message = run_killed_at(k, out.parent, lambda: export.export_checkpoint(source, out))
        print(json.dumps({"k": k, "status": status, "write": message, "out_files": _files(out)}), flush=True)
        if status != 9:
            return
        k += 1


if __name__ == "__main__":
    main(sys.argv[1:])
