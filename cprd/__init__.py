"""cprd: save every QEMU VM on a host with cpr-reboot, restore it after a kexec."""

__version__ = "0.1.0"
