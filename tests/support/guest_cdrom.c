/* The CD-ROM tray from inside the guest, as util-linux eject does it: the cdrom layer's
 * ioctls on /dev/sr0 (opened O_NONBLOCK, so an empty drive opens too).
 *
 *   guest_cdrom DEV eject|close|status
 *
 * eject: CDROMEJECT (ALLOW MEDIUM REMOVAL, START STOP UNIT LoEj); close: CDROMCLOSETRAY
 * (START STOP UNIT LoEj|Start); status prints CDROM_DRIVE_STATUS's answer by name.
 * Exit status 0 on success, 1 with the error on stderr. */
#include <fcntl.h>
#include <limits.h>
#include <linux/cdrom.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    static const char *names[] = {"no-info", "no-disc", "tray-open", "not-ready", "disc-ok"};
    int fd, rc;

    if (argc != 3) {
        fprintf(stderr, "usage: %s DEV eject|close|status\n", argv[0]);
        return 2;
    }
    fd = open(argv[1], O_RDONLY | O_NONBLOCK);
    if (fd < 0) {
        perror(argv[1]);
        return 1;
    }
    if (!strcmp(argv[2], "eject"))
        rc = ioctl(fd, CDROMEJECT, 0);
    else if (!strcmp(argv[2], "close"))
        rc = ioctl(fd, CDROMCLOSETRAY, 0);
    else {
        rc = ioctl(fd, CDROM_DRIVE_STATUS, CDSL_CURRENT);
        if (rc >= 0) {
            printf("%s\n", rc <= CDS_DISC_OK ? names[rc] : "?");
            rc = 0;
        }
    }
    if (rc < 0) {
        perror(argv[2]);
        return 1;
    }
    close(fd);
    return 0;
}
