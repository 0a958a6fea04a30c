"""Component tests: a VM on the sim backend (the scriptable guest), or a subsystem served
in-process or as a child process (the vhost-user back end with the Python front end, the
ACRN backend against its recording fake, the CLI on ``--hv sim``, the monitor, systemd
notify, the adversarial suite)."""
