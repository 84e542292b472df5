/* The command: found on PATH, spawned (vfork, as posix_spawn does), waited for by PID 1 or by
 * an exec helper, its end reported, as container/init.py does. */
#include "minictr_init.h"

/* -- the command ---------------------------------------------------------------------- */

/* The program `name` names, found on PATH as Python's init.find_program does. */
int find_program(const char *name, const char *search, char *found, size_t size) {
    if (strchr(name, '/')) { snprintf(found, size, "%s", name); return 0; }
    const char *dir = search;
    for (;;) {
        const char *end = strchrnul(dir, ':');
        snprintf(found, size, "%.*s/%s", (int)(end - dir), end == dir ? "." : dir, name);
        if (end == dir) snprintf(found, size, "./%s", name);
        struct stat info;
        if (stat(found, &info) == 0 && S_ISREG(info.st_mode) && access(found, X_OK) == 0)
            return 0;
        if (!*end) break;
        dir = end + 1;
    }
    return fail_with("CommandNotFoundError", "exec", ENOENT,
                     "command '%s' not found in the container (PATH=%s)", name, search);
}

int exec_failure(const char *program, int errnum) {
    char message[1024];
    snprintf(message, sizeof message, "cannot execute '%s' in the container: %s", program,
             strerror(errnum));
    if (errnum != ENOENT && errnum != EACCES && errnum != ENOEXEC && errnum != ENOTDIR)
        return fail_with("ContainerSetupError", "exec", errnum, "%s", message);
    struct stat info;
    if (errnum == ENOENT && lstat(program, &info) == 0)
        return fail_with("CommandNotFoundError", "exec", errnum, "%s (its interpreter or "
                         "dynamic loader is missing from the rootfs)", message);
    if (errnum == ENOENT || errnum == ENOTDIR)
        return fail_with("CommandNotFoundError", "exec", errnum,
                         "command '%s' not found in the container's rootfs", program);
    return fail_with("CommandNotFoundError", "exec", errnum, "%s", message);
}

/* `minictr run -t`: a pty of the container's own devpts (its /dev/pts/N for ttyname() and ps),
 * the master sent back on the console socket the caller gave as stdin (SCM_RIGHTS), the slave
 * in place of stdin, stdout and stderr, as init.open_terminal does. The slave is opened
 * through the master (TIOCGPTPEER), not by a path another process could have replaced. */
int do_open_terminal(call *c) {
    (void)c;  /* args: the fds (a Ref: ours are globals) */
    int master = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC), unlock = 0;
    SUB("open /dev/ptmx", master);
    int slave = ioctl(master, TIOCSPTLCK, &unlock) < 0 ? -1
                : ioctl(master, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (slave < 0) { int saved = errno; close(master); return fail("open /dev/ptmx", saved); }
    char byte = 't', control[CMSG_SPACE(sizeof(int))] = {0};
    struct iovec data = {&byte, 1};
    struct msghdr message = {.msg_iov = &data, .msg_iovlen = 1, .msg_control = control,
                             .msg_controllen = sizeof control};
    struct cmsghdr *header = CMSG_FIRSTHDR(&message);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(header), &master, sizeof(int));
    ssize_t sent;
    do sent = sendmsg(fds.stdin_, &message, MSG_NOSIGNAL); while (sent < 0 && errno == EINTR);
    int saved = errno;
    close(master);  /* the caller's now: none of ours may keep it */
    if (sent < 0) { close(slave); return fail("send the terminal to the caller", saved); }
    int stdio[3] = {fds.stdin_, fds.stdout_, fds.stderr_};
    for (int i = 0; i < 3; i++) SUB("open the terminal", dup3(slave, stdio[i], O_CLOEXEC));
    close(slave);
    return 0;
}

/* Spawn the command: a new session (CVE-2017-5226), stdio, default signals, an empty mask,
 * and no other fd (CVE-2024-21626). */
pid_t spawn_command(json *argv_json, json *env_json, int terminal) {
    int argc = argv_json->count, envc = env_json->count;
    char **argv = calloc(argc + 1, sizeof *argv), **envp = calloc(envc + 1, sizeof *envp);
    const char *path = "";
    if (!argv || !envp) return -1;  /* ENOMEM: an "as" or "data" rlimit can starve PID 1 */
    for (int i = 0; i < argc; i++) argv[i] = argv_json->items[i]->str;
    for (int i = 0; i < envc; i++) {
        json **pair = env_json->items[i]->items;
        if (asprintf(&envp[i], "%s=%s", pair[0]->str, pair[1]->str) < 0) return -1;
        if (!strcmp(pair[0]->str, "PATH")) path = pair[1]->str;
    }
    char program[4096];
    if (find_program(argv[0], path, program, sizeof program) < 0) return -1;
    /* vfork: the child shares our memory until it execs, so an exec failure comes back in
     * `exec_errno`, not on a pipe the command could write into through /proc/1/fd */
    static volatile int exec_errno;
    exec_errno = 0;
    pid_t pid = vfork();
    if (pid < 0) return fail_with("ContainerSetupError", "exec", errno, "cannot execute '%s' "
                                  "in the container: %s", program, strerror(errno));
    if (pid == 0) {
        int stdio[3] = {fds.stdin_, fds.stdout_, fds.stderr_};
        sigset_t none;
        sigemptyset(&none);
        setsid();
        /* `minictr run -t`: the pseudo-terminal on its stdin (the container's own, see
         * do_open_terminal) becomes its controlling terminal, so that a shell gets job control
         * and ^C its foreground group */
        if (terminal && ioctl(fds.stdin_, TIOCSCTTY, 0) < 0) {
            exec_errno = errno;
            _exit(127);
        }
        /* an fd of ours may sit on a later target: move each out of the way first */
        for (int target = 0; target < 3; target++)
            stdio[target] = fcntl(stdio[target], F_DUPFD_CLOEXEC, 10);
        for (int target = 0; target < 3; target++) dup2(stdio[target], target);
        syscall(SYS_close_range, 3, ~0U, CLOSE_RANGE_CLOEXEC_);
        sigprocmask(SIG_SETMASK, &none, NULL);
        execve(program, argv, envp);
        exec_errno = errno;
        _exit(127);
    }
    if (exec_errno) {
        waitpid(pid, NULL, 0);
        return exec_failure(program, exec_errno);
    }
    return pid;
}

sigset_t waited_signals;  /* forwarded ones and SIGCHLD: blocked, taken by sigwait */

void report_end(int status_fd, int wait_status) {
    struct rusage usage;
    getrusage(RUSAGE_CHILDREN, &usage);
    double seconds = usage.ru_utime.tv_sec + usage.ru_stime.tv_sec
                     + (usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
    char text[128];
    int length = snprintf(text, sizeof text, "{\"command\":%d,\"cpu_time\":%.6f}\n",
                          wait_status, seconds);
    write_line(status_fd, text, length);
}

/* Reap every child (orphans come to PID 1) and forward signals until the command exits. */
int reap_until(pid_t command) {
    for (;;) {
        int status;
        pid_t pid;
        while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
            if (pid == command) return status;
        siginfo_t info;
        int signum = sigwaitinfo(&waited_signals, &info);
        if (signum > 0 && signum != SIGCHLD) kill(command, signum);
    }
}

int do_run_command_as_init(call *c) {
    /* args: argv, env, the fds, the signal proxy (Refs: ours are globals), terminal */
    pid_t command = spawn_command(ARG(0), ARG(1), c->count > 4 && NUM(4) == 1);
    if (command < 0) return -1;
    close(fds.stdin_); close(fds.stdout_); close(fds.stderr_); close(fds.setup);
    /* our own 0-2 came from the launcher: nothing of it may be reachable via /proc/1/fd */
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    for (int target = 0; null >= 0 && target < 3; target++) dup2(null, target);
    if (null > 2) close(null);
    int status = reap_until(command);
    /* the command is done: kill and reap what it left before reporting its end */
    if (kill(-1, SIGKILL) == 0)
        while (waitpid(-1, NULL, 0) > 0 || errno == EINTR) {}
    report_end(fds.status, status);
    _exit(0);
}

int do_run_command_beside(call *c) {
    /* args: argv, env, the fds (a Ref: ours are globals), terminal */
    pid_t command = spawn_command(ARG(0), ARG(1), c->count > 3 && NUM(3) == 1);
    if (command < 0) return -1;
    write_status(fds.setup, "pid", command);
    close(fds.stdin_); close(fds.stdout_); close(fds.stderr_); close(fds.setup);
    int status = 0;
    for (;;) {
        pid_t pid = waitpid(command, &status, WNOHANG);
        if (pid == command) break;
        siginfo_t info;
        sigwaitinfo(&waited_signals, &info);  /* (an exec helper forwards nothing) */
    }
    report_end(fds.status, status);
    _exit(0);
}
