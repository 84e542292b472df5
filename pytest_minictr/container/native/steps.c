/* The steps of a plan that are not mounts (container/network.py, userns.py, security.py),
 * and the helpers every process of the core shares. Each action returns 0, or -1 with
 * `failed` set (by fail() for a named sub-step) or errno left for the step itself. */
#include "minictr_init.h"

/* ---------------------------------------------------------------------------------------
 * Small helpers of the actions */

int write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = write(fd, text, strlen(text));
    int saved = errno;
    close(fd);
    errno = saved;
    return n < 0 ? -1 : 0;
}

int arm_parent_death_signal(int pidfd) {
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0) return -1;
    struct pollfd p = {pidfd, POLLIN, 0};
    if (poll(&p, 1, 0) > 0) _exit(1);  /* it died before that was armed */
    return 0;
}

int compare_ints(const void *a, const void *b) {
    return *(const int *)a - *(const int *)b;
}

/* Close every fd from 3 up but `keep`. */
void close_fds_except(int *keep, int count) {
    qsort(keep, count, sizeof *keep, compare_ints);
    unsigned low = 3;
    for (int i = 0; i < count; i++) {
        if (keep[i] < (int)low) continue;
        if (keep[i] > (int)low) syscall(SYS_close_range, low, keep[i] - 1, 0);
        low = keep[i] + 1;
    }
    syscall(SYS_close_range, low, ~0U, 0);
}

int do_write_file(call *c) { return write_file(STR(0), STR(1)); }
int do_unshare(call *c) { return unshare(NUM(0)); }
int do_setns(call *c) { return setns(NUM(0), NUM(1)); }
int do_set_dumpable(call *c) { return prctl(PR_SET_DUMPABLE, NUM(0) ? 1 : 0, 0, 0, 0); }
int do_chdir(call *c) { return chdir(STR(0)); }
int do_nothing(call *c) { RETURN(NONE); }
int do_set_hostname(call *c) { return sethostname(STR(0), strlen(STR(0))); }

/* IFF_UP set or cleared on `name`; taken down, it also loses its IPv4 address, as a new
   network namespace has it (see linux.take_loopback_down). */
static int set_link(const char *name, int up) {
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0) return -1;
    struct ifreq request = {0};
    snprintf(request.ifr_name, IFNAMSIZ, "%s", name);
    int result = ioctl(sock, SIOCGIFFLAGS, &request);
    if (result == 0) {
        request.ifr_flags = up ? request.ifr_flags | IFF_UP : request.ifr_flags & ~IFF_UP;
        result = ioctl(sock, SIOCSIFFLAGS, &request);
    }
    if (result == 0 && !up) {
        struct sockaddr_in *address = (struct sockaddr_in *)&request.ifr_addr;
        memset(&request.ifr_ifru, 0, sizeof request.ifr_ifru);
        address->sin_family = AF_INET;
        address->sin_addr.s_addr = htonl(INADDR_ANY);  /* 0.0.0.0 removes it (no SIOCDIFADDR) */
        result = ioctl(sock, SIOCSIFADDR, &request);
    }
    int saved = errno;
    close(sock);
    errno = saved;
    return result;
}

int set_link_up(const char *name) { return set_link(name, 1); }

int do_set_link_up(call *c) { return set_link_up(STR(0)); }

int do_take_loopback_down(call *c) {
    (void)c;
    return set_link("lo", 0);
}

int do_open_low_ports_and_ping(call *c) {
    (void)c;
    if (write_file("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0") < 0) return -1;
    return write_file("/proc/sys/net/ipv4/ping_group_range", "0 2147483647");
}

int do_own_network(call *c) {
    if (unshare(CLONE_NEWNET) < 0) return -1;
    return strcmp(STR(0), "loopback") ? 0 : set_link_up("lo");
}

int do_map_own_ids(call *c) {
    char text[64];
    if (write_file("/proc/self/setgroups", "deny") < 0) return -1;
    snprintf(text, sizeof text, "0 %lld 1\n", NUM(0));
    if (write_file("/proc/self/uid_map", text) < 0) return -1;
    snprintf(text, sizeof text, "0 %lld 1\n", NUM(1));
    return write_file("/proc/self/gid_map", text);
}

int do_wait_for_id_maps(call *c) {
    char answer = 0;
    if (write(NUM(0), "1", 1) < 0) return -1;
    if (read(NUM(1), &answer, 1) != 1 || answer != '1')
        return fail_with("ContainerSetupError", "write uid/gid maps", 0,
                         "the launcher could not map the container's ids");
    close(NUM(0));
    close(NUM(1));
    return 0;
}

void write_status(int fd, const char *key, long long value) {
    char text[64];
    int length = snprintf(text, sizeof text, "{\"%s\":%lld}\n", key, value);
    write_line(fd, text, length);
}

int do_fork_init_under_keeper(call *c) {
    (void)c;
    int keeper_pidfd = syscall(SYS_pidfd_open, getpid(), 0);
    if (keeper_pidfd < 0) return -1;
    pid_t init_pid = fork();
    if (init_pid < 0) return -1;
    if (init_pid == 0) {
        int keep[] = {fds.stdin_, fds.stdout_, fds.stderr_, fds.setup, fds.status, keeper_pidfd};
        arm_parent_death_signal(keeper_pidfd);
        close_fds_except(keep, 6);
        RETURN(keeper_pidfd);  /* the init's "parent pidfd" from now on (plan.run_as) */
    }
    /* the keeper: outside the PID namespace, it holds the namespaces and reports */
    write_status(fds.setup, "pid", init_pid);
    close(fds.stdin_); close(fds.stdout_); close(fds.stderr_); close(fds.setup);
    close(keeper_pidfd);
    int status = 0;
    while (waitpid(init_pid, &status, 0) < 0 && errno == EINTR) {}
    write_status(fds.status, "init", status);
    _exit(0);
}

int do_install_signal_proxy(call *c) {
    (void)c;
    /* forwarded signals stay blocked since the zygote; the init waits for them (sigwait) */
    RETURN(NONE);
}

int do_arm_parent_death_signal(call *c) { return arm_parent_death_signal(NUM(0)); }

int do_enter_user_namespace(call *c) {
    if (setns(NUM(0), CLONE_NEWUSER) < 0 || setgroups(0, NULL) < 0 || setresgid(0, 0, 0) < 0
        || setresuid(0, 0, 0) < 0)
        return -1;
    return prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);  /* an id change resets it */
}

static const struct { const char *name; int resource; } rlimit_names[] = {
    {"as", RLIMIT_AS}, {"core", RLIMIT_CORE}, {"cpu", RLIMIT_CPU}, {"data", RLIMIT_DATA},
    {"fsize", RLIMIT_FSIZE}, {"locks", RLIMIT_LOCKS}, {"memlock", RLIMIT_MEMLOCK},
    {"msgqueue", RLIMIT_MSGQUEUE}, {"nice", RLIMIT_NICE}, {"nofile", RLIMIT_NOFILE},
    {"nproc", RLIMIT_NPROC}, {"rss", RLIMIT_RSS}, {"rtprio", RLIMIT_RTPRIO},
    {"rttime", RLIMIT_RTTIME}, {"sigpending", RLIMIT_SIGPENDING}, {"stack", RLIMIT_STACK}};

int set_rlimit(const char *name, long long soft, long long hard) {
    for (size_t i = 0; i < sizeof rlimit_names / sizeof *rlimit_names; i++) {
        if (strcmp(rlimit_names[i].name, name)) continue;
        struct rlimit limit = {soft < 0 ? RLIM_INFINITY : (rlim_t)soft,
                               hard < 0 ? RLIM_INFINITY : (rlim_t)hard};
        if (setrlimit(rlimit_names[i].resource, &limit) == 0) return 0;
        char shown[2][32];
        long long values[2] = {soft, hard};
        for (int k = 0; k < 2; k++)
            if (values[k] < 0) snprintf(shown[k], 32, "'unlimited'");
            else snprintf(shown[k], 32, "%lld", values[k]);
        return fail_with("ContainerSetupError", "set rlimits", errno,
                         "set rlimits: %s=(%s, %s): %s (the kernel's ceiling, e.g. fs.nr_open "
                         "for nofile, or a hard limit raised without root)", name, shown[0],
                         shown[1], strerror(errno));
    }
    return fail_with("ContainerSetupError", "set rlimits", EINVAL, "set rlimits: unknown %s",
                     name);
}

int do_set_rlimits(call *c) {
    json *limits = ARG(0);
    long long size = NUM(1);
    int has_fsize = 0;
    for (int i = 0; i < limits->count; i++)
        has_fsize |= !strcmp(limits->items[i]->items[0]->str, "fsize");
    if (!has_fsize) {  /* a default never raises a hard limit */
        struct rlimit current;
        getrlimit(RLIMIT_FSIZE, &current);
        long long bound = size;
        if (current.rlim_max != RLIM_INFINITY && (long long)current.rlim_max < bound)
            bound = current.rlim_max;
        if (set_rlimit("fsize", bound, bound) < 0) return -1;
    }
    for (int i = 0; i < limits->count; i++) {
        json **pair = limits->items[i]->items;
        if (set_rlimit(pair[0]->str, number(pair[1]), number(pair[2])) < 0) return -1;
    }
    return 0;
}

int do_join_new_session_keyring(call *c) {
    (void)c;
    return syscall(SYS_keyctl, 1 /* KEYCTL_JOIN_SESSION_KEYRING */, NULL) < 0 ? -1 : 0;
}

int do_drop_capabilities(call *c) {
    unsigned long long kept = NUM(0);
    for (int number = 0; number < 64; number++) {
        if (kept & (1ULL << number)) continue;
        if (prctl(PR_CAPBSET_DROP, number, 0, 0, 0) < 0) {
            if (errno == EINVAL) break;  /* past the last capability this kernel has */
            return -1;
        }
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) return -1;
    struct { uint32_t version; int pid; } header = {0x20080522 /* version 3 */, 0};
    struct { uint32_t effective, permitted, inheritable; } data[2] = {
        {kept & 0xFFFFFFFF, kept & 0xFFFFFFFF, 0}, {kept >> 32, kept >> 32, 0}};
    if (syscall(SYS_capset, &header, data) < 0) return -1;
    return prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
}

int do_switch_ids(call *c) {
    uid_t uid = NUM(0);
    gid_t gid = NUM(1);
    if (setgroups(0, NULL) < 0 || setresgid(gid, gid, gid) < 0 || setresuid(uid, uid, uid) < 0)
        return -1;
    return prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);  /* an id change resets it */
}

int do_install_seccomp_filter(call *c) {
    /* args: the allowed names (Python's cache key) and the program Python built, in hex */
    const char *hex = STR(1);
    size_t size = strlen(hex) / 2;
    unsigned char *program = malloc(size + 8);
    if (!program) return -1;
    for (size_t i = 0; i < size; i++) sscanf(hex + 2 * i, "%2hhx", &program[i]);
    struct { unsigned short len; void *filter; } fprog = {size / 8, program};
    return prctl(PR_SET_SECCOMP, 2 /* SECCOMP_MODE_FILTER */, &fprog, 0, 0);
}
