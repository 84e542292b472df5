/* minictr-init: the native core of pytest-minictr (libc only).
 *
 * What runs of a container before and as its PID 1, without Python: the launcher starts this
 * program once, from a sealed memfd copy (so /proc/1/exe names no host path, and a container
 * cannot write through it into the file we run: runc's CVE-2019-5736), as the "zygote" that
 * forks spare inits for it. A spare carries out the setup plan Python built (container/plan.py)
 * step by step, with the same action names as container/executor.py, then becomes the
 * container's PID 1: it spawns the command, forwards signals to it, reaps, and reports the
 * end on the status pipe as container/init.py does.
 *
 * Policy stays in Python (which mounts, capabilities, the seccomp program, the id maps): the
 * plan carries it as plain values. This program only carries steps out, and reports a failed
 * one as the Python executor does: {"error": {type, message, step, errno, phase}} on the setup
 * pipe. This file is its life (the zygote, a spare, a keeper or exec helper); executor.c holds the
 * executor, steps.c and mounts.c the actions, command.c the command and PID 1.
 *
 * Like CPython's _posixsubprocess, the dangerous window between fork and exec is a small C
 * function here; unlike it, this process is our own small program, so it may allocate.
 */
#include "minictr_init.h"

/* ---------------------------------------------------------------------------------------
 * Messages from the launcher: a 4-byte big-endian length, JSON, fds on the first byte */

static char *receive(int sock, int *received_fds, int *fd_count) {
    unsigned char header[4];
    char control[CMSG_SPACE(MAX_FDS * sizeof(int))];
    struct iovec iov = {header, 4};
    struct msghdr message = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                             .msg_controllen = sizeof control};
    ssize_t got;
    while ((got = recvmsg(sock, &message, MSG_CMSG_CLOEXEC)) < 0 && errno == EINTR) {}
    *fd_count = 0;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&message); cm; cm = CMSG_NXTHDR(&message, cm))
        if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
            int n = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            memcpy(received_fds + *fd_count, CMSG_DATA(cm), n * sizeof(int));
            *fd_count += n;
        }
    if (got <= 0) return NULL;
    size_t have = got;
    while (have < 4) {
        got = read(sock, header + have, 4 - have);
        if (got <= 0) return NULL;
        have += got;
    }
    size_t length = (size_t)header[0] << 24 | header[1] << 16 | header[2] << 8 | header[3];
    char *payload = malloc(length + 1);
    if (!payload) return NULL;
    for (have = 0; have < length; have += got)
        if ((got = read(sock, payload + have, length - have)) <= 0) return NULL;
    payload[length] = 0;
    return payload;
}

static void reply(int sock, const char *text) {
    size_t length = strlen(text);
    unsigned char header[4] = {length >> 24, length >> 16, length >> 8, length};
    write_line(sock, (char *)header, 4);
    write_line(sock, text, length);
}

/* ---------------------------------------------------------------------------------------
 * A spare: PID 1 of its namespaces, carrying out the plan's prefix that needs no spec, then
 * waiting on `channel` for the rest and the container's descriptors. */

static void run_spare(int channel, json *prepared, int *keep, int keep_count) {
    int kept[16], count = 0;
    kept[count++] = channel;
    kept[count++] = parent_pidfd;
    for (int i = 0; i < keep_count && count < 16; i++) kept[count++] = keep[i];
    arm_parent_death_signal(parent_pidfd);
    close_fds_except(kept, count);
    save_slot("parent pidfd", parent_pidfd, 0);
    int early = run_plan(prepared);
    failure early_failure = failed;
    const char *early_phase = failed_phase;
    int received[MAX_FDS], received_count;
    char *order = receive(channel, received, &received_count);
    if (!order) _exit(0);  /* discarded: the launcher is shutting down */
    close(channel);
    if (received_count < 5) _exit(1);
    fds = (child_fds){received[0], received[1], received[2], received[3], received[4]};
    if (received_count > 5)  /* a pod's network namespace, to join (plan.name_and_network) */
        save_slot("pod netns", received[5], 0);
    if (early < 0) {
        failed = early_failure;
        report_failure(fds.setup, early_phase);
        _exit(1);
    }
    const char *cursor = order;
    json *rest = parse_value(&cursor);
    if (run_plan(rest) < 0) report_failure(fds.setup, failed_phase);
    _exit(1);  /* the plan's last step runs the command and exits */
}

/* ---------------------------------------------------------------------------------------
 * A whole plan in a child (a keeper, an exec helper): `received` holds the container's five
 * fds, then those the plan names, which go to the numbers `at` gives (the launcher's). */

static void run_child(json *plan, json *at, int *received, int count, int *keep,
                      int keep_count) {
    int base = 100, kept[MAX_FDS + 1], kept_count = 0;
    for (int i = 0; i < at->count; i++)
        if (at->items[i]->num >= base) base = at->items[i]->num + 1;
    /* out of the way of every target first: a received fd may sit where another goes */
    for (int i = 0; i < count; i++) {
        int moved = fcntl(received[i], F_DUPFD_CLOEXEC, base);
        close(received[i]);
        received[i] = moved;
    }
    if (count < 5 + at->count) _exit(1);
    fds = (child_fds){received[0], received[1], received[2], received[3], received[4]};
    for (int i = 0; i < 5; i++) kept[kept_count++] = received[i];
    for (int i = 0; i < at->count; i++) {
        int target = at->items[i]->num;
        dup3(received[5 + i], target, O_CLOEXEC);
        close(received[5 + i]);
        kept[kept_count++] = target;
    }
    (void)keep; (void)keep_count;
    kept[kept_count++] = parent_pidfd;
    arm_parent_death_signal(parent_pidfd);
    close_fds_except(kept, kept_count);
    save_slot("parent pidfd", parent_pidfd, 0);
    if (run_plan(plan) < 0) {
        report_failure(fds.setup, failed_phase);
        _exit(1);
    }
    _exit(0);
}

/* ---------------------------------------------------------------------------------------
 * The zygote: a child for each order, until the end of its socket. Each is forked with
 * CLONE_PARENT (the launcher is its parent, reaps it, and its PR_SET_PDEATHSIG watches it); a
 * spare with CLONE_NEWPID too (PID 1 of its own PID namespace). */

static json *member(json *object, const char *key) {
    for (int i = 0; object->type == 'o' && i + 1 < object->count; i += 2)
        if (!strcmp(object->items[i]->str, key)) return object->items[i + 1];
    return NULL;
}

static void serve(int sock, int *keep, int keep_count) {
    for (;;) {
        int received[MAX_FDS], count;
        char *text = receive(sock, received, &count);
        if (!text) _exit(0);
        const char *cursor = text;
        json *order = parse_value(&cursor);
        json *spare = member(order, "spare"), *plan = member(order, "run");
        json *at = member(order, "at");
        pid_t pid = -1;
        errno = EINVAL;
        if ((spare && count >= 1) || (plan && at))
            pid = syscall(SYS_clone, CLONE_PARENT | SIGCHLD | (spare ? CLONE_NEWPID : 0),
                          0, 0, 0, 0);
        if (pid == 0) {
            close(sock);
            if (spare) run_spare(received[0], spare, keep, keep_count);
            run_child(plan, at, received, count, keep, keep_count);
        }
        char answer[256];
        if (pid < 0)
            snprintf(answer, sizeof answer, "{\"error\":\"%s\",\"errno\":%d}", strerror(errno),
                     errno);
        else
            snprintf(answer, sizeof answer, "{\"pid\":%d}", pid);
        for (int i = 0; i < count; i++) close(received[i]);
        free(text);
        free_json(order);
        reply(sock, answer);
    }
}

/* argv: minictr-init zygote SOCK PARENT_PIDFD [KEEP...]   (the fds it inherits)
 *       minictr-init actions                                (the action names, one a line) */
int main(int argc, char **argv) {
    /* Run from /proc/self/fd/N, the kernel names us "N", and every spare, keeper and
     * container PID 1 forked from us inherits that name: `ps` in a container showed "9". */
    prctl(PR_SET_NAME, "minictr-init", 0, 0, 0);
    if (argc == 2 && !strcmp(argv[1], "actions")) {
        print_actions();
        return 0;
    }
    if (argc < 4 || strcmp(argv[1], "zygote")) {
        fprintf(stderr, "minictr-init: started by pytest-minictr's launcher only\n");
        return 2;
    }
    int sock = atoi(argv[2]);
    parent_pidfd = atoi(argv[3]);
    int keep[16], keep_count = 0;
    for (int i = 4; i < argc && keep_count < 14; i++) keep[keep_count++] = atoi(argv[i]);
    if (arm_parent_death_signal(parent_pidfd) < 0) return 1;
    int kept[16] = {sock, parent_pidfd};
    memcpy(kept + 2, keep, keep_count * sizeof *keep);
    close_fds_except(kept, keep_count + 2);
    /* Forwarded signals and SIGCHLD stay blocked in every spare, from before its command
     * exists until the init waits for them: none is lost in between. Every disposition is
     * the default (what the launcher ignored, the command must not). */
    sigfillset(&waited_signals);
    sigdelset(&waited_signals, SIGKILL);
    sigdelset(&waited_signals, SIGSTOP);
    static const int faults[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS};
    for (size_t i = 0; i < sizeof faults / sizeof *faults; i++) sigdelset(&waited_signals, faults[i]);
    for (int signum = 1; signum < NSIG; signum++) signal(signum, SIG_DFL);
    sigprocmask(SIG_BLOCK, &waited_signals, NULL);
    serve(sock, keep, keep_count);
    return 0;
}
