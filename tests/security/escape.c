/* Escape attempts run inside a container by tests/security.
 *
 * Usage: escape SUBCOMMAND [ARGS...]
 *
 * Each subcommand tries one way out (or one thing a way out would need) and prints exactly one
 * line, then exits 0, so that a test can assert on the exact outcome:
 *
 *   BLOCKED <ERRNO>            the attempt failed, with that errno (EPERM, EACCES, ...)
 *   BLOCKED <ERRNO> at <step>  a multi-step attempt failed at <step>
 *   ESCAPED <detail>           the attempt worked where it must not have
 *   ALLOWED / CONTAINED / ...  a neutral fact (a loosened call went through, a listing)
 *
 * Exit status 2 means the helper itself was misused (unknown subcommand, missing argument).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/io_uring.h>
#include <linux/perf_event.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/msg.h>
#include <sys/ptrace.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

/* linux/keyctl.h values, to need no libkeyutils headers */
#define KEYCTL_GET_KEYRING_ID 0
#define KEY_SPEC_SESSION_KEYRING -3

static int blocked(const char *step)
{
    const char *name = strerrorname_np(errno);
    if (step)
        printf("BLOCKED %s at %s\n", name ? name : "E?", step);
    else
        printf("BLOCKED %s\n", name ? name : "E?");
    return 0;
}

/* A raw system call's outcome: ALLOWED when it returned >= 0 (the fd it made is closed). */
static int outcome(long ret)
{
    if (ret < 0)
        return blocked(NULL);
    if (ret > 2)
        close((int)ret);
    printf("ALLOWED\n");
    return 0;
}

static int same_inode(const struct stat *a, const struct stat *b)
{
    return a->st_dev == b->st_dev && a->st_ino == b->st_ino;
}

/* ---- filesystem view ------------------------------------------------------------------ */

/* chroot [PLANT]. The chroot ".." escape: chroot into a subdirectory while holding an fd of
 * the old root, fchdir back to it and climb; then chroot(".") wherever the climb ended, and
 * create PLANT there. With the old root detached after pivot_root, the top of the climb is the
 * container's root, not the host's. */
static int do_chroot(int argc, char **argv)
{
    struct stat root_before, root_after;
    stat("/", &root_before);
    mkdir("/tmp/jail", 0755);
    int old_root = open("/", O_RDONLY | O_DIRECTORY);
    if (chroot("/tmp/jail") < 0)
        return blocked("chroot");
    if (fchdir(old_root) < 0)
        return blocked("fchdir");
    for (int i = 0; i < 64; i++)
        chdir("..");
    if (chroot(".") < 0)
        return blocked("chroot .");
    stat("/", &root_after);
    if (argc > 0)
        close(open(argv[0], O_WRONLY | O_CREAT, 0644));
    if (!same_inode(&root_before, &root_after)) {
        printf("ESCAPED climbed above the container root\n");
        return 0;
    }
    printf("CONTAINED at the container root\n");
    return 0;
}

/* The descriptors this process holds: a leaked fd of a host directory is a way out of any
 * root (CVE-2024-21626), so only 0, 1 and 2 may be there. */
static int do_fds(int argc, char **argv)
{
    (void)argc; (void)argv;
    DIR *dir = opendir("/proc/self/fd");
    if (!dir)
        return blocked("opendir");
    int own = dirfd(dir), fds[64], count = 0;
    struct dirent *entry;
    while ((entry = readdir(dir)) && count < 64) {
        if (entry->d_name[0] == '.' || atoi(entry->d_name) == own)
            continue;
        fds[count++] = atoi(entry->d_name);
    }
    closedir(dir);
    for (int i = 0; i < count; i++)  /* sort: readdir order is not promised */
        for (int j = i + 1; j < count; j++)
            if (fds[j] < fds[i]) { int t = fds[i]; fds[i] = fds[j]; fds[j] = t; }
    printf("FDS");
    for (int i = 0; i < count; i++)
        printf(" %d", fds[i]);
    printf("\n");
    return 0;
}

static int do_open(int argc, char **argv)
{
    if (argc < 1)
        return 2;
    return outcome(open(argv[0], O_RDONLY));
}

static int do_readlink(int argc, char **argv)
{
    if (argc < 1)
        return 2;
    char target[4096];
    ssize_t len = readlink(argv[0], target, sizeof target - 1);
    if (len < 0)
        return blocked(NULL);
    target[len] = 0;
    printf("LINK %s\n", target);
    return 0;
}

/* Whether two paths name one directory: /proc/self/root/.. must lead back to "/". */
static int do_same(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    struct stat a, b;
    if (stat(argv[0], &a) < 0 || stat(argv[1], &b) < 0)
        return blocked("stat");
    printf(same_inode(&a, &b) ? "SAME\n" : "DIFFERENT\n");
    return 0;
}

/* Number of bytes a file reads as: a masked /proc file reads as empty. */
static int do_read(int argc, char **argv)
{
    if (argc < 1)
        return 2;
    int fd = open(argv[0], O_RDONLY);
    if (fd < 0)
        return blocked(NULL);
    char buf[4096];
    long total = 0;
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0)
        total += n;
    if (n < 0)
        return blocked("read");
    printf("READ %ld\n", total);
    return 0;
}

static int do_write(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    int fd = open(argv[0], O_WRONLY);
    if (fd < 0)
        return blocked("open");
    if (write(fd, argv[1], strlen(argv[1])) < 0)
        return blocked("write");
    printf("ESCAPED wrote %s\n", argv[0]);
    return 0;
}

static int do_create(int argc, char **argv)
{
    if (argc < 1)
        return 2;
    int fd = open(argv[0], O_WRONLY | O_CREAT | O_EXCL, 0644);
    if (fd < 0)
        return blocked(NULL);
    printf("CREATED %s\n", argv[0]);
    return 0;
}

/* "Shocker" (2014): open_by_handle_at() opens any inode of the filesystem behind a mount fd,
 * whatever the caller's root; inode 2 is an ext* filesystem's root directory. */
static int do_open_by_handle(int argc, char **argv)
{
    if (argc < 1)
        return 2;
    int mount_fd = open(argv[0], O_RDONLY | O_DIRECTORY);
    if (mount_fd < 0)
        return blocked("open mount point");
    struct {
        struct file_handle head;
        unsigned int ino_gen[2];
    } handle = {.head = {.handle_bytes = 8, .handle_type = 1}, .ino_gen = {2, 0}};
    long fd = syscall(SYS_open_by_handle_at, mount_fd, &handle.head, O_RDONLY | O_DIRECTORY);
    if (fd < 0)
        return blocked(NULL);
    printf("ESCAPED opened inode 2 behind %s\n", argv[0]);
    return 0;
}

/* ---- mounts ---------------------------------------------------------------------------- */

/* mount TYPE DIR [OPTIONS]: a fresh filesystem (tmpfs, proc, sysfs, cgroup...) at DIR. */
static int do_mount(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    mkdir(argv[1], 0755);
    if (mount(argv[0], argv[1], argv[0], 0, argc > 2 ? argv[2] : NULL) < 0)
        return blocked(NULL);
    printf("ESCAPED mounted %s on %s\n", argv[0], argv[1]);
    return 0;
}

/* Make a read-only mount (a /proc/sys bind) writable again. */
static int do_remount_rw(int argc, char **argv)
{
    if (argc < 1)
        return 2;
    if (mount(NULL, argv[0], NULL, MS_REMOUNT | MS_BIND, NULL) < 0)
        return blocked(NULL);
    printf("ESCAPED remounted %s read-write\n", argv[0]);
    return 0;
}

/* Take a mask off /proc (kcore, keys...) to reach what it hides. */
static int do_umount(int argc, char **argv)
{
    if (argc < 1)
        return 2;
    if (umount2(argv[0], MNT_DETACH) < 0)
        return blocked(NULL);
    printf("ESCAPED unmounted %s\n", argv[0]);
    return 0;
}

/* mknod PATH c|b MAJOR MINOR: a device node opens the device whatever the namespace
 * (char 1:1 is /dev/mem, block 8:0 the first disk). */
static int do_mknod(int argc, char **argv)
{
    if (argc < 4)
        return 2;
    mode_t kind = argv[1][0] == 'b' ? S_IFBLK : S_IFCHR;
    if (mknod(argv[0], kind | 0600, makedev(atoi(argv[2]), atoi(argv[3]))) < 0)
        return blocked(NULL);
    printf("ESCAPED made %s\n", argv[0]);
    return 0;
}

/* ---- processes ------------------------------------------------------------------------- */

static int do_ptrace(int argc, char **argv)
{
    if (argc < 1)
        return 2;
    pid_t pid = atoi(argv[0]);
    if (ptrace(PTRACE_ATTACH, pid, 0, 0) < 0)
        return blocked(NULL);
    waitpid(pid, NULL, __WALL);
    ptrace(PTRACE_DETACH, pid, 0, 0);
    printf("ESCAPED attached to %d\n", pid);
    return 0;
}

/* Every pid this process can see in /proc, ascending. */
static int do_pids(int argc, char **argv)
{
    (void)argc; (void)argv;
    DIR *dir = opendir("/proc");
    if (!dir)
        return blocked("opendir");
    int pids[256], count = 0;
    struct dirent *entry;
    while ((entry = readdir(dir)) && count < 256)
        if (entry->d_name[0] >= '1' && entry->d_name[0] <= '9')
            pids[count++] = atoi(entry->d_name);
    closedir(dir);
    for (int i = 0; i < count; i++)
        for (int j = i + 1; j < count; j++)
            if (pids[j] < pids[i]) { int t = pids[i]; pids[i] = pids[j]; pids[j] = t; }
    printf("PIDS");
    for (int i = 0; i < count; i++)
        printf(" %d", pids[i]);
    printf("\n");
    return 0;
}

/* The filesystem types mounted in this mount namespace, sorted, each once. */
static int do_fstypes(int argc, char **argv)
{
    (void)argc; (void)argv;
    FILE *mountinfo = fopen("/proc/self/mountinfo", "r");
    if (!mountinfo)
        return blocked("open");
    char line[4096], types[64][64];
    int count = 0;
    while (fgets(line, sizeof line, mountinfo) && count < 64) {
        char *rest = strstr(line, " - "), type[64];
        if (!rest || sscanf(rest + 3, "%63s", type) != 1)
            continue;
        int seen = 0;
        for (int i = 0; i < count; i++)
            seen |= strcmp(types[i], type) == 0;
        if (!seen)
            strcpy(types[count++], type);
    }
    fclose(mountinfo);
    qsort(types, count, sizeof types[0], (int (*)(const void *, const void *))strcmp);
    printf("FSTYPES");
    for (int i = 0; i < count; i++)
        printf(" %s", types[i]);
    printf("\n");
    return 0;
}

static int do_euid(int argc, char **argv)
{
    (void)argc; (void)argv;
    printf("EUID %d\n", (int)geteuid());
    return 0;
}

/* as_user UID PROGRAM [ARGS...]: drop to UID, then exec PROGRAM (a setuid one, say). */
static int do_as_user(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    uid_t id = atoi(argv[0]);
    if (setgroups(0, NULL) < 0 || setresgid(id, id, id) < 0 || setresuid(id, id, id) < 0)
        return blocked("setuid");
    execv(argv[1], argv + 1);
    return blocked("exec");
}

/* ---- network and IPC ------------------------------------------------------------------- */

/* raw_socket packet|inet: forged frames, and every packet of the interface to sniff. */
static int do_raw_socket(int argc, char **argv)
{
    if (argc < 1)
        return 2;
    if (strcmp(argv[0], "packet") == 0)
        return outcome(socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL)));
    return outcome(socket(AF_INET, SOCK_RAW, IPPROTO_ICMP));
}

/* ping_socket: an ICMP echo socket, which needs no capability where ping_group_range allows. */
static int do_ping_socket(int argc, char **argv)
{
    (void)argc, (void)argv;
    return outcome(socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP));
}

static int connected(int fd, const struct sockaddr *address, socklen_t size)
{
    if (fd < 0)
        return blocked("socket");
    if (connect(fd, address, size) < 0)
        return blocked(NULL);
    printf("ESCAPED connected\n");
    return 0;
}

static int do_connect_tcp(int argc, char **argv)
{
    if (argc < 1)
        return 2;
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[0])),
                                  .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    return connected(socket(AF_INET, SOCK_STREAM, 0), (struct sockaddr *)&address,
                     sizeof address);
}

/* connect_abstract NAME: the abstract unix namespace ("\0NAME") belongs to the network
 * namespace, not to any filesystem a mount namespace could hide. */
static int do_connect_abstract(int argc, char **argv)
{
    if (argc < 1)
        return 2;
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    size_t len = strlen(argv[0]);
    if (len + 1 > sizeof address.sun_path)
        return 2;
    memcpy(address.sun_path + 1, argv[0], len);
    return connected(socket(AF_UNIX, SOCK_STREAM, 0), (struct sockaddr *)&address,
                     (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + len));
}

static int do_shmget(int argc, char **argv)
{
    if (argc < 1)
        return 2;
    int id = shmget((key_t)strtol(argv[0], NULL, 0), 0, 0);
    if (id < 0)
        return blocked(NULL);
    printf("ESCAPED found host shm %d\n", id);
    return 0;
}

static int do_msgget(int argc, char **argv)
{
    if (argc < 1)
        return 2;
    int id = msgget((key_t)strtol(argv[0], NULL, 0), 0);
    if (id < 0)
        return blocked(NULL);
    printf("ESCAPED found host message queue %d\n", id);
    return 0;
}

/* ---- system calls the seccomp filter denies -------------------------------------------- */

static long try_bpf(void)
{
    union bpf_attr attr = {.map_type = BPF_MAP_TYPE_ARRAY, .key_size = 4, .value_size = 4,
                           .max_entries = 1};
    return syscall(SYS_bpf, BPF_MAP_CREATE, &attr, sizeof attr);
}

static long try_userfaultfd(void)
{
    return syscall(SYS_userfaultfd, O_CLOEXEC);
}

static long try_perf_event_open(void)
{
    struct perf_event_attr attr = {.type = PERF_TYPE_SOFTWARE, .size = sizeof attr,
                                   .config = PERF_COUNT_SW_CPU_CLOCK, .disabled = 1,
                                   .exclude_kernel = 1, .exclude_hv = 1};
    return syscall(SYS_perf_event_open, &attr, 0, -1, -1, 0);
}

/* An empty segment list: nothing would be loaded even if the call were let through. */
static long try_kexec_load(void)
{
    return syscall(SYS_kexec_load, 0UL, 0UL, NULL, 0UL);
}

static long try_init_module(void)
{
    return syscall(SYS_init_module, NULL, 0UL, "");
}

static long try_finit_module(void)
{
    return syscall(SYS_finit_module, 0, "", 0);
}

static long try_delete_module(void)
{
    return syscall(SYS_delete_module, "minictr_no_such_module", O_NONBLOCK);
}

static long try_io_uring_setup(void)
{
    struct io_uring_params params;
    memset(&params, 0, sizeof params);
    return syscall(SYS_io_uring_setup, 1, &params);
}

static long try_keyctl(void)
{
    return syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0);
}

static long try_add_key(void)
{
    return syscall(SYS_add_key, "user", "minictr-planted-key", "x", 1, KEY_SPEC_SESSION_KEYRING);
}

static long try_unshare_user(void)
{
    return unshare(CLONE_NEWUSER);
}

static long try_clone_user(void)
{
    long pid = syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, NULL, NULL, NULL, 0);
    if (pid == 0)
        _exit(0);
    if (pid > 0) {
        waitpid((pid_t)pid, NULL, 0);
        return 0;
    }
    return pid;
}

static long try_clone3(void)
{
    return syscall(SYS_clone3, NULL, 0);
}

static long try_setns(void)
{
    int fd = open("/proc/self/ns/net", O_RDONLY);
    return fd < 0 ? fd : syscall(SYS_setns, fd, 0);
}

static long try_syslog(void)
{
    char buf[64];
    return syscall(SYS_syslog, 3 /* SYSLOG_ACTION_READ_ALL */, buf, (int)sizeof buf);
}

static long try_swapon(void)
{
    return syscall(SYS_swapon, "/dev/null", 0);
}

static const struct {
    const char *name;
    long (*call)(void);
} SYSCALLS[] = {
    {"bpf", try_bpf}, {"userfaultfd", try_userfaultfd},
    {"perf_event_open", try_perf_event_open}, {"kexec_load", try_kexec_load},
    {"init_module", try_init_module}, {"finit_module", try_finit_module},
    {"delete_module", try_delete_module}, {"io_uring_setup", try_io_uring_setup},
    {"keyctl", try_keyctl}, {"add_key", try_add_key}, {"unshare_user", try_unshare_user},
    {"clone_user", try_clone_user}, {"clone3", try_clone3}, {"setns", try_setns},
    {"syslog", try_syslog}, {"swapon", try_swapon},
};

/* syscall NAME: one call from the table above, with arguments that do no harm. */
static int do_syscall(int argc, char **argv)
{
    if (argc < 1)
        return 2;
    for (size_t i = 0; i < sizeof SYSCALLS / sizeof SYSCALLS[0]; i++)
        if (strcmp(argv[0], SYSCALLS[i].name) == 0)
            return outcome(SYSCALLS[i].call());
    fprintf(stderr, "escape: unknown syscall %s\n", argv[0]);
    return 2;
}

/* TIOCSTI pushes characters into a terminal's input, to be read by whoever reads it next: a
 * shell of the host sharing the terminal (CVE-2016-7545, CVE-2017-5226). */
static int do_tiocsti(int argc, char **argv)
{
    (void)argc; (void)argv;
    char c = '!';
    if (ioctl(0, TIOCSTI, &c) < 0)
        return blocked(NULL);
    printf("ESCAPED pushed input into the terminal on stdin\n");
    return 0;
}

/* release_agent HIERARCHY. CVE-2022-0492: in a user namespace of its own, root mounts a cgroup
 * v1 hierarchy and sets its release_agent, a program the host kernel runs as host root when a
 * group empties. */
static int do_release_agent(int argc, char **argv)
{
    if (argc < 1)
        return 2;
    if (unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWCGROUP) < 0)
        return blocked("unshare");
    mkdir("/tmp/cgroup", 0755);
    if (mount("cgroup", "/tmp/cgroup", "cgroup", 0, argv[0]) < 0)
        return blocked("mount");
    int fd = open("/tmp/cgroup/release_agent", O_WRONLY);
    if (fd < 0)
        return blocked("release_agent");
    if (write(fd, "/minictr-planted-agent", 22) < 0)
        return blocked("release_agent");
    printf("ESCAPED set release_agent\n");
    return 0;
}

/* In a user namespace of its own, root holds every capability: over what it owns, though,
 * not over the PID namespace a fresh /proc would show (owned by the host). */
static int do_userns_proc(int argc, char **argv)
{
    (void)argc; (void)argv;
    if (unshare(CLONE_NEWUSER | CLONE_NEWNS) < 0)
        return blocked("unshare");
    mkdir("/tmp/proc", 0755);
    if (mount("proc", "/tmp/proc", "proc", 0, NULL) < 0)
        return blocked("mount");
    printf("ESCAPED mounted a fresh proc\n");
    return 0;
}

static const struct {
    const char *name;
    int (*run)(int argc, char **argv);
} COMMANDS[] = {
    {"chroot", do_chroot}, {"fds", do_fds}, {"open", do_open}, {"readlink", do_readlink},
    {"same", do_same}, {"read", do_read}, {"write", do_write}, {"create", do_create},
    {"open_by_handle", do_open_by_handle}, {"mount", do_mount}, {"remount_rw", do_remount_rw},
    {"umount", do_umount}, {"mknod", do_mknod}, {"ptrace", do_ptrace}, {"pids", do_pids},
    {"fstypes", do_fstypes}, {"euid", do_euid}, {"as_user", do_as_user},
    {"raw_socket", do_raw_socket}, {"ping_socket", do_ping_socket},
    {"connect_tcp", do_connect_tcp}, {"connect_abstract", do_connect_abstract},
    {"shmget", do_shmget}, {"msgget", do_msgget}, {"syscall", do_syscall},
    {"tiocsti", do_tiocsti}, {"release_agent", do_release_agent},
    {"userns_proc", do_userns_proc},
};

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: escape SUBCOMMAND [ARGS...]\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (size_t i = 0; i < sizeof COMMANDS / sizeof COMMANDS[0]; i++)
        if (strcmp(argv[1], COMMANDS[i].name) == 0)
            return COMMANDS[i].run(argc - 2, argv + 2);
    fprintf(stderr, "escape: unknown subcommand %s\n", argv[1]);
    return 2;
}
