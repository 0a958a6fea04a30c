"""Guest tests: the small guest programs (devicemodel/guestkit/programs/) on the KVM
backend; skipped where /dev/kvm is not usable."""
