"""Build hook: compile proto/ into Python modules under service/needlepoint/v1 (not committed)."""

from __future__ import annotations

from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


def generate(root: Path) -> list[Path]:
    import grpc_tools
    from google.rpc import status_pb2
    from grpc_tools import protoc

    proto_dir = root / "proto"
    out_dir = root / "service"
    sources = sorted(proto_dir.rglob("*.proto"))
    if not sources:
        return []
    include = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    googleapis = Path(status_pb2.__file__).resolve().parents[2]  # google/rpc/*.proto
    args = [
        "protoc",
        f"-I{proto_dir}",
        f"-I{include}",
        f"-I{googleapis}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(s.relative_to(proto_dir)) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + " ".join(map(str, sources)))
    generated = sorted((out_dir / "needlepoint" / "v1").glob("*.py*"))
    init = out_dir / "needlepoint" / "v1" / "__init__.py"
    init.write_text('"""Generated from proto/needlepoint/v1 at build time. Do not edit."""\n')
    return generated + [init]


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict) -> None:
        root = Path(self.root)
        generated = generate(root)
        if version != "editable":  # generated files are git-ignored, so name them explicitly
            for path in generated:
                build_data["force_include"][str(path)] = str(path.relative_to(root / "service"))
