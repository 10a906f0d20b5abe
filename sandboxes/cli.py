"""CLI: `m2rl sandboxes gc` and `m2rl images build [--base-only] [SPEC ...]`."""

from __future__ import annotations

import argparse
import sys

from m2rl.sandboxes.errors import SandboxError


def register(subparsers: argparse._SubParsersAction) -> None:
    sandboxes = subparsers.add_parser("sandboxes", help="manage sandboxes")
    sb_sub = sandboxes.add_subparsers(dest="sandboxes_command", required=True)
    gc = sb_sub.add_parser("gc", help="remove leaked sandbox containers, checkpoint images and state dirs")
    gc.add_argument(
        "--all",
        action="store_true",
        help="remove every labelled container, not only those whose owner process died",
    )
    gc.add_argument("--dry-run", action="store_true", help="list what would be removed")
    gc.set_defaults(func=cmd_gc)

    images = subparsers.add_parser("images", help="build sandbox images offline")
    img_sub = images.add_subparsers(dest="images_command", required=True)
    build = img_sub.add_parser(
        "build", help="build the base image and derived images (cached by content hash)"
    )
    build.add_argument("specs", nargs="*", metavar="SPEC", help="derived image spec files (.yaml/.json)")
    build.add_argument("--base-only", action="store_true", help="build only the base image")
    build.add_argument("--force", action="store_true", help="rebuild even when the content hash is cached")
    build.set_defaults(func=cmd_images_build)


def cmd_gc(args: argparse.Namespace) -> int:
    from m2rl.sandboxes.gc import collect

    report = collect(all_containers=args.all, dry_run=args.dry_run)
    for name in report.containers:
        print(f"container {name}")
    for name in report.images:
        print(f"image {name}")
    for name in report.state_dirs:
        print(f"state dir {name}")
    print(("would have " if args.dry_run else "") + report.summary())
    for line in report.skipped_lines():
        print(line)
    return 0


def cmd_images_build(args: argparse.Namespace) -> int:
    from m2rl.sandboxes.images import ImageSpec, build_base, build_image

    from m2rl.cli import print_error

    if args.base_only and args.specs:
        return print_error("--base-only takes no SPEC arguments")
    try:
        specs = [ImageSpec.from_file(path) for path in args.specs]  # parse all before building any
        print(build_base(force=args.force))
        for spec in specs:
            print(build_image(spec, force=args.force))
    except SandboxError as exc:
        print_error(exc)
        return 1  # a bad spec or a failed build (2 is for bad arguments)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m m2rl.sandboxes.cli ...`: the same as `m2rl ...` (one error format, the same commands)."""
    from m2rl.cli import main as m2rl_main

    return m2rl_main(argv)


if __name__ == "__main__":
    sys.exit(main())
