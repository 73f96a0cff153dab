"""A tiny local container image for the podman tests: Debian's static busybox.

No image can be pulled on the test machines, so the image is built from
``/bin/busybox`` (package ``busybox-static``): a rootfs with busybox and one
symlink per applet, tarred and ``podman import``-ed. Idempotent and fast when
the image already exists.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

IMAGE = "localhost/ecloud-test-busybox:latest"
BUSYBOX = Path("/bin/busybox")


def podman_missing_reason() -> str | None:
    """Why the podman tests cannot run here, or None when they can."""
    if shutil.which("podman") is None:
        return "podman is not installed (apt-get install podman runc; scripts/setup-podman.sh)"
    return None


def ensure_image(podman: str = "podman") -> str:
    """Build (once) and return the name of the busybox test image."""
    exists = subprocess.run([podman, "image", "exists", IMAGE], capture_output=True, timeout=60)
    if exists.returncode == 0:
        return IMAGE
    if not BUSYBOX.is_file():
        raise RuntimeError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
    with tempfile.TemporaryDirectory(prefix="ecloud-image-") as tmp:
        root = Path(tmp) / "rootfs"
        for sub in ("bin", "etc", "tmp", "mnt", "root", "proc", "sys", "dev"):
            (root / sub).mkdir(parents=True)
        shutil.copy2(BUSYBOX, root / "bin" / "busybox")
        for applet in applets:
            if applet != "busybox":
                (root / "bin" / applet).symlink_to("busybox")
        (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (root / "etc" / "group").write_text("root:x:0:\n")
        tar_path = Path(tmp) / "rootfs.tar"
        with tarfile.open(tar_path, "w") as tar:
            tar.add(root, arcname=".")
        subprocess.run(
            [podman, "import", "--change", "ENV PATH=/bin", "--change", 'CMD ["/bin/sh"]',
             str(tar_path), IMAGE],
            check=True, capture_output=True, timeout=300,
        )
    return IMAGE
