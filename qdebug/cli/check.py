"""`qdebug check` (qemu-img check's counts, messages and exit codes) and `qdebug repair`."""

from __future__ import annotations

import argparse
import json
import sys

from ..engine.errors import QcowError
from .common import one_line
from .conventions import EXIT_NOT_SUPPORTED, add_force_share

# `check -r all` where qemu-img would rebuild the refcount structure (a referenced cluster with
# refcount 0, a broken refcount block...; 271's unaligned data cluster is one): the same counts,
# written differently. Deliberate, so said every time.
QEMU_REBUILDS = (
    "qdebug: note: this repair differs from qemu-img check -r all: qemu-img rebuilds the whole refcount "
    "structure here (a new refcount table and new blocks at the end of the file, the old ones left as free "
    "space); qdebug writes the same refcounts into the existing blocks (new blocks only where one is missing "
    "or broken), so the change is small, journaled and undoable (`qdebug undo`). The refcounts and the guest "
    "data are the same; the file layout and size differ.")


def _warn_guest_data(img, report, image: str) -> None:
    """Before leaked clusters are freed: say which look like guest data, and how to keep them."""
    from ..engine.check.repair import leaked_guest_data

    offs = leaked_guest_data(img, report)
    if offs:
        shown = ", ".join(f"0x{o:x}" for o in offs[:8]) + (" ..." if len(offs) > 8 else "")
        print(f"qdebug: warning: {len(offs)} leaked cluster(s) to be freed look like guest data (host {shown}): "
              f"a table may have lost its entries; save them first with `qdebug salvage {one_line(image)} "
              "--orphans DIR`", file=sys.stderr)

# The repair policies (engine.check.repair.RepairPolicy), spelled here so that `--help` does not
# load the repair code; tests/cli/test_check_cli.py holds the two to each other.
POLICY_NAMES = ("keep-data", "zero", "unallocate")


def _human_summary(counts: dict, out) -> None:
    """qemu-img's dump_human_image_check."""
    c = counts
    corr, leaks, errs = c.get("corruptions", 0), c.get("leaks", 0), c.get("check-errors", 0)
    if not (corr or leaks or errs):
        out.write("No errors were found on the image.\n")
    else:
        if corr:
            out.write(f"\n{corr} errors were found on the image.\n"
                      "Data may be corrupted, or further writes to the image may corrupt it.\n")
        if leaks:
            out.write(f"\n{leaks} leaked clusters were found on the image.\n"
                      "This means waste of disk space, but no harm to data.\n")
        if errs:
            out.write(f"\n{errs} internal errors have occurred during the check.\n")
    total, alloc = c.get("total-clusters", 0), c.get("allocated-clusters", 0)
    if total and alloc:
        out.write(f"{alloc}/{total} = {alloc * 100.0 / total:.2f}% allocated, "
                  f"{c.get('fragmented-clusters', 0) * 100.0 / alloc:.2f}% fragmented, "
                  f"{c.get('compressed-clusters', 0) * 100.0 / alloc:.2f}% compressed clusters\n")
    if c.get("image-end-offset"):
        out.write(f"Image end offset: {c['image-end-offset']}\n")


def _messages(report, out) -> None:
    from ..engine.check.checker import Severity

    for f in report.findings:
        if f.severity is Severity.INFO:
            continue
        place = f.place()
        out.write(f"{f.message}" + (f"  [{place}]" if place else "") + "\n")


def cmd_check(args) -> int:
    from dataclasses import replace

    from ..engine.check.checker import check_image

    fixed = None
    if _not_qcow2(args.image):
        print(f"qdebug: error: {one_line(args.image)}: This image format does not support checks (not a qcow2 "
              "image; qemu-img check says the same)", file=sys.stderr)
        return EXIT_NOT_SUPPORTED
    if not args.repair:  # the image alone, read-only: no backing chain or repair code to load
        from ..engine.check.checkfile import check_file

        report = final = check_file(args.image, force_share=args.force_share, keep_references=False)
    elif args.force_share:
        raise QcowError(f"{args.image}: force share (-U) can only be used with read-only checks, not with -r")
    else:
        from ..engine.check.repair import check_repair
        from ..engine.file.chain import open_chain
        from ..engine.file.locking import HeldFiles, lock_chain, lock_files, release_all

        _recover_first(args.image)
        with open_chain(args.image, writable=True, no_backing=True) as chain:
            locks = lock_chain(chain, write=True)  # nobody writes between the check and the repair
            below = HeldFiles()
            try:
                below = lock_files(args.image, top=False)  # qemu-img check -r opens the backing chain too
                report = replace(check_image(chain.top), filename=args.image)
                _warn_guest_data(chain.top, report, args.image)
                report, plan, final = check_repair(chain, args.repair, filename=args.image, before=report)
            except QcowError as e:
                if not str(e).startswith("ERROR need to rebuild"):
                    raise  # e.g. the image is in use: one line from main()
                _messages(report, sys.stderr)
                sys.stderr.write(f"{e}\n")
                print("qdebug: error: Check failed: Input/output error", file=sys.stderr)
                return 1
            finally:
                below.release()
                release_all(locks)
            if plan.leaks_fixed or plan.corruptions_fixed:
                fixed = plan
            if report.rebuild_needed and plan.items:
                print(QEMU_REBUILDS, file=sys.stderr)
            for u in plan.unsupported:
                if "its data is not freed" in u:
                    print(f"qdebug: kept: {u}", file=sys.stderr)
    args.exit_status = final.exit_code  # the status even when stdout is a pipe closed early
    for f in report.findings:
        if f.kind.value == "backing-outside-directory":
            print(f"qdebug: warning: {one_line(f.message)}", file=sys.stderr)
    if args.output == "json":
        out = final.to_json()
        if fixed is not None:
            out["findings-before-repair"] = [f.to_json() for f in report.findings]
        print(json.dumps(out, indent=4))
    else:
        _messages(report, sys.stderr)
        if fixed is not None:
            print("The following inconsistencies were found and repaired:\n\n"
                  f"    {fixed.leaks_fixed} leaked clusters\n    {fixed.corruptions_fixed} corruptions\n\n"
                  "Double checking the fixed image now...")
            _messages(final, sys.stderr)
        _human_summary(final.counts(), sys.stdout)
    if final.check_errors:
        print("qdebug: error: Check failed", file=sys.stderr)
    return final.exit_code


def _not_qcow2(path: str) -> bool:
    """A regular file that qemu-img would probe as another format (raw): check has nothing to check."""
    import os
    import stat

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False  # not readable: the open below says why, naming the file
    return len(head) > 0 and head != b"QFI\xfb"


def _entry(text: str):
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            return int(a, 0), int(b, 0)
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad entry {text!r}: use L2_INDEX or L1_INDEX:L2_INDEX") from None


MAX_ROUNDS = 1000  # repair rounds (each a journal step) past the findings a check lists per kind


def _recover_first(image: str) -> None:
    """A step an interrupted run left unfinished is rolled back (under the image's lock) before
    anything is checked or planned: a plan made on the torn image would be wrong once it is."""
    from ..engine.file.journal import recover

    if recover(image):
        print(f"qdebug: note: {image}: rolled back a step an interrupted run left unfinished", file=sys.stderr)


def _note_unfinished(image: str) -> None:
    from ..engine.file.journal import journal_steps

    steps = journal_steps(image)
    if steps and not steps[-1].committed:
        print(f"qdebug: warning: {image}: an interrupted run left a journal step unfinished (`qdebug undo {image}` "
              "rolls it back); this plan is of the image as that run left it", file=sys.stderr)


def _repair_rounds(chain, plan, before, args, steps: list) -> object:
    """Apply `plan`, check again, and go on while findings past the per-kind cap of the check
    remain (each round one journal step); returns the last check. `steps` collects the steps."""
    from ..engine.check.checker import check_image
    from ..engine.check.repair import apply_repair, plan_repair

    after = before
    for _ in range(MAX_ROUNDS):
        steps.append(apply_repair(chain, plan))
        after = check_image(chain.top)
        if not before.unlisted or after.corruptions + after.leaks >= before.corruptions + before.leaks:
            return after  # the plan saw every finding, or no progress: what is left is said to the user
        before = after
        plan = plan_repair(chain, after, policy=args.policy, entries=args.entry)
        if not plan.items:
            return after
    return after


def cmd_repair(args) -> int:
    steps: list[int] = []
    try:
        return _repair(args, steps)
    except KeyboardInterrupt:  # (SIGINT, SIGTERM, SIGHUP) whenever it comes
        if steps:  # what was committed stays committed: say so, not just "interrupted"
            print(f"repaired ({_steps_text(steps, args.image)}); interrupted before the result was checked and reported: "
                  f"`qdebug check {args.image}` tells what is left", file=sys.stderr)
        raise


def _repair(args, steps: list[int]) -> int:
    from ..engine.check.checker import MAX_FINDINGS_PER_KIND, check_image
    from ..engine.check.repair import plan_repair
    from ..engine.file.chain import open_chain
    from ..engine.file.locking import lock_chain, release_all

    if not args.dry_run:
        _recover_first(args.image)
    else:
        _note_unfinished(args.image)
    with open_chain(args.image, writable=not args.dry_run, no_backing=args.no_backing) as chain:
        # nobody writes between the check and the repair (-U: a dry run shares everything)
        locks = lock_chain(chain, write=not args.dry_run, force_share=args.force_share)
        try:
            before = check_image(chain.top)
            failed = [f for f in before.findings if f.kind.value == "check-failed"]
            if failed:  # HX: references are incomplete, so any refcount plan would be wrong
                raise QcowError(f"{args.image}: {failed[0].message}; nothing is repaired until the check completes")
            plan = plan_repair(chain, before, policy=args.policy, entries=args.entry)
            if plan.leaks_fixed:
                _warn_guest_data(chain.top, before, args.image)
            if args.output == "json":
                out = {"plan": plan.to_json(), "before": before.counts()}
            else:
                print(f"{args.image}: {before.corruptions} errors, {before.leaks} leaks; repair plan "
                      f"(policy {args.policy}{', dry run' if args.dry_run else ''}):")
                print(plan.to_text())
                if before.unlisted:
                    print(f"... and {before.unlisted} more findings past the first {MAX_FINDINGS_PER_KIND} of their "
                          "kind: the repair goes on in rounds (one journal step each) until none is left")
            if args.dry_run or not plan.items:
                if args.output == "json":
                    print(json.dumps(out, indent=4))
                if plan.unsupported or (not plan.items and before.exit_code):
                    # findings the plan leaves broken (or nothing to do about them): not a success
                    if args.output != "json":
                        print(f"{len(plan.unsupported) or before.corruptions + before.leaks} finding(s) "
                              f"{'would remain' if plan.items else 'remain'} unrepaired.", file=sys.stderr)
                    return before.exit_code if before.exit_code in (2, 3) else 2  # 1 means an error
                if plan.items:  # a dry run with work to do: `if qdebug repair --dry-run IMG` means "nothing to do"
                    return before.exit_code if before.exit_code in (2, 3) else 2  # 1 means an error
                return 0
            after = _repair_rounds(chain, plan, before, args, steps)
        finally:
            release_all(locks)
    if args.output == "json":
        out["after"] = after.counts()
        out["journal-step"] = steps[-1]
        out["journal-steps"] = steps
        print(json.dumps(out, indent=4))
    else:
        print(f"repaired ({_steps_text(steps, args.image)}).")
        if after.exit_code == 0:
            print("Checked again: no errors were found on the image.")
        else:
            print(f"Checked again: {after.corruptions} errors, {after.leaks} leaks remain"
                  + (f" ({after.unlisted} of them past the listing cap)" if after.unlisted else "") + ":")
            _messages(after, sys.stdout)
    return 0 if after.exit_code == 0 else after.exit_code


def _steps_text(steps: list[int], image: str) -> str:
    if len(steps) == 1:
        return f"journal step {steps[0]}; `qdebug undo {image}` reverts it"
    return f"in {len(steps)} rounds, journal steps {steps[0]}-{steps[-1]}; `qdebug undo --steps {len(steps)} {image}` " \
           "reverts them"


def register(sub) -> None:
    sp = sub.add_parser("check", help="qemu-img check: same counts, messages and exit codes, findings located")
    sp.add_argument("image", metavar="IMAGE")
    sp.add_argument("--output", choices=("human", "json"), default="human")
    sp.add_argument("-r", dest="repair", choices=("leaks", "all"), default=None,
                    help="repair as qemu-img check -r does (compressed data is never freed)")
    sp.add_argument("-U", "--force-share", action="store_true",
                    help="check an image a running QEMU holds for writing (as qemu-img check -U; no lock taken)")
    sp.set_defaults(func=cmd_check)

    sp = sub.add_parser("repair", help="repair every finding, invalid subclusters included, with a preview "
                                       "(undo with `qdebug undo IMAGE`)")
    sp.add_argument("image", metavar="IMAGE")
    sp.add_argument("--policy", choices=POLICY_NAMES, default=POLICY_NAMES[0],
                    help="for subclusters both allocated and zero: keep the data (default), read zeros, "
                         "or unallocate (backing file)")
    sp.add_argument("--entry", type=_entry, action="append", metavar="L2_INDEX",
                    help="repair only this L2 entry (L2_INDEX or L1_INDEX:L2_INDEX); repeatable")
    sp.add_argument("--dry-run", action="store_true", help="print the plan and preview, write nothing")
    sp.add_argument("--no-backing", action="store_true",
                    help="do not open the backing file (previews then show unallocated ranges as zeros)")
    sp.add_argument("--output", choices=("human", "json"), default="human")
    add_force_share(sp, dry_run_only=True)
    sp.set_defaults(func=cmd_repair)
