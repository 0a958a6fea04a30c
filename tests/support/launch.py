"""acrn-dm's command line as ACRN's generated launch scripts write it."""

from __future__ import annotations


def typical_line(images) -> list[str]:
    """acrn-facts §4.3: the line ACRN's sample launch_user_vm_id1.sh runs, paths replaced."""
    return [
        "--windows", "--cpu_affinity", "0,2", "-m", "4096M",
        "--ovmf", images["ovmf"],
        "-s", "1:0,lpc", "-s", "0:0,hostbridge",
        "-s", "3,virtio-console,@stdio:stdio_port",
        "-s", "4,virtio-net,tap=WaaG,mac_seed=00:11:22:33:44:55-POST_STD_VM1",
        "-s", f"5,virtio-blk,{images['disk']}",
        "-s", "2,passthru,0/2/0",
        "--logger_setting", "console,level=4;kmsg,level=3;disk,level=5",
        "POST_STD_VM1",
    ]
