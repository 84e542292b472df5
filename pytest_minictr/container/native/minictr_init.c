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
 * plan carries it as plain values. This file only carries steps out, and reports a failed one
 * as the Python executor does: {"error": {type, message, step, errno, phase}} on the setup pipe.
 *
 * Like CPython's _posixsubprocess, the dangerous window between fork and exec is a small C
 * function here; unlike it, this process is our own small program, so it may allocate.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <grp.h>
#include <limits.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_open_tree
#define SYS_open_tree 428
#endif
#ifndef SYS_mount_setattr
#define SYS_mount_setattr 442
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#define OPEN_TREE_CLONE_ 1
#define AT_RECURSIVE_ 0x8000
#define MOUNT_ATTR_IDMAP_ 0x00100000ULL
#define CLOSE_RANGE_CLOEXEC_ 4
#define MAX_FDS 32  /* the container's five, and up to eight namespaces an exec helper joins */

/* ---------------------------------------------------------------------------------------
 * JSON, the subset a plan and the launcher's messages use */

typedef struct json {
    char type;            /* n(ull) b(ool) i(nt) s(tring) a(rray) o(bject) */
    long long num;
    char *str;
    int count;
    struct json **items;  /* array items; object: key (string), value, key, value... */
} json;

static json *parse_value(const char **p);

static void skip_space(const char **p) { while (isspace((unsigned char)**p)) (*p)++; }

static json *new_json(char type) {
    json *v = calloc(1, sizeof *v);
    if (!v) _exit(121);
    v->type = type;
    return v;
}

static void put_utf8(char **out, unsigned code) {
    char *o = *out;
    if (code < 0x80) *o++ = code;
    else if (code < 0x800) { *o++ = 0xC0 | code >> 6; *o++ = 0x80 | (code & 0x3F); }
    else if (code < 0x10000) {
        *o++ = 0xE0 | code >> 12; *o++ = 0x80 | ((code >> 6) & 0x3F); *o++ = 0x80 | (code & 0x3F);
    } else {
        *o++ = 0xF0 | code >> 18; *o++ = 0x80 | ((code >> 12) & 0x3F);
        *o++ = 0x80 | ((code >> 6) & 0x3F); *o++ = 0x80 | (code & 0x3F);
    }
    *out = o;
}

static char *parse_string(const char **p) {
    const char *s = *p + 1, *end = s;
    while (*end && *end != '"') end += (*end == '\\' && end[1]) ? 2 : 1;
    char *out = malloc(end - s + 1), *o = out;
    if (!out) _exit(121);
    while (s < end) {
        if (*s != '\\') { *o++ = *s++; continue; }
        s++;
        switch (*s) {
        case 'n': *o++ = '\n'; s++; break;
        case 't': *o++ = '\t'; s++; break;
        case 'r': *o++ = '\r'; s++; break;
        case 'b': *o++ = '\b'; s++; break;
        case 'f': *o++ = '\f'; s++; break;
        case 'u': {
            unsigned code = strtoul((char[5]){s[1], s[2], s[3], s[4], 0}, NULL, 16);
            s += 5;
            /* Python writes a code point past the BMP as a surrogate pair; a lone surrogate
             * (surrogateescape'd bytes) stands for the byte it escapes */
            if (code >= 0xD800 && code < 0xDC00 && s[0] == '\\' && s[1] == 'u') {
                unsigned low = strtoul((char[5]){s[2], s[3], s[4], s[5], 0}, NULL, 16);
                code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
                s += 6;
            } else if (code >= 0xDC80 && code < 0xDD00) {
                *o++ = (char)(code - 0xDC00);
                break;
            }
            put_utf8(&o, code);
            break;
        }
        default: *o++ = *s++;
        }
    }
    *o = 0;
    *p = *end ? end + 1 : end;
    return out;
}

static json *parse_list(const char **p, char type, char close) {
    json *v = new_json(type);
    int size = 0;
    (*p)++;
    skip_space(p);
    while (**p && **p != close) {
        if (v->count + 2 > size) {
            size = size ? size * 2 : 8;
            v->items = realloc(v->items, size * sizeof *v->items);
            if (!v->items) _exit(121);
        }
        v->items[v->count++] = parse_value(p);
        skip_space(p);
        if (**p == ':' || **p == ',') (*p)++;
        skip_space(p);
    }
    if (**p) (*p)++;
    return v;
}

static json *parse_value(const char **p) {
    skip_space(p);
    json *v;
    switch (**p) {
    case '[': return parse_list(p, 'a', ']');
    case '{': return parse_list(p, 'o', '}');
    case '"': v = new_json('s'); v->str = parse_string(p); return v;
    case 't': v = new_json('b'); v->num = 1; *p += 4; return v;
    case 'f': v = new_json('b'); *p += 5; return v;
    case 'n': v = new_json('n'); *p += 4; return v;
    default: v = new_json('i'); v->num = strtoll(*p, (char **)p, 10); return v;
    }
}

static void free_json(json *v) {
    for (int i = 0; i < v->count; i++) free_json(v->items[i]);
    free(v->items);
    free(v->str);
    free(v);
}

/* The value of {"ref": slot}, or NULL for anything else. */
static const char *ref_of(const json *v) {
    if (v->type == 'o' && v->count == 2 && !strcmp(v->items[0]->str, "ref"))
        return v->items[1]->str;
    return NULL;
}

static void write_json_string(FILE *out, const char *s) {
    fputc('"', out);
    for (; *s; s++) {
        unsigned char c = *s;
        if (c == '"' || c == '\\') fprintf(out, "\\%c", c);
        else if (c < 0x20) fprintf(out, "\\u%04x", c);
        else if (c >= 0x80) {
            /* valid UTF-8 passes as it is; JSON readers in Python take it */
            fputc(c, out);
        } else fputc(c, out);
    }
    fputc('"', out);
}

static void write_line(int fd, const char *text, size_t length) {
    while (length) {
        ssize_t n = write(fd, text, length);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return;
        text += n;
        length -= n;
    }
}

/* ---------------------------------------------------------------------------------------
 * Failures: what a failed step reports (container/failure.py's format) */

typedef struct {
    const char *type;       /* ContainerSetupError, CommandNotFoundError */
    char step[512];         /* the step, or the sub-step inside it, that failed */
    char message[2048];
    int errnum;             /* 0: none */
} failure;

static failure failed;

/* Record that `step` failed with errno `errnum`: "<step>: <strerror>". Returns -1. */
static int fail(const char *step, int errnum) {
    failed.type = "ContainerSetupError";
    snprintf(failed.step, sizeof failed.step, "%s", step);
    snprintf(failed.message, sizeof failed.message, "%s: %s", step, strerror(errnum));
    failed.errnum = errnum;
    return -1;
}

static int fail_with(const char *type, const char *step, int errnum, const char *format, ...) {
    va_list args;
    va_start(args, format);
    failed.type = type;
    snprintf(failed.step, sizeof failed.step, "%s", step);
    vsnprintf(failed.message, sizeof failed.message, format, args);
    failed.errnum = errnum;
    va_end(args);
    return -1;
}

static void report_failure(int fd, const char *phase) {
    char *text = NULL;
    size_t length = 0;
    FILE *out = open_memstream(&text, &length);
    if (!out) return;
    fputs("{\"error\":{\"type\":", out);
    write_json_string(out, failed.type ? failed.type : "ContainerSetupError");
    fputs(",\"message\":", out);
    write_json_string(out, failed.message);
    fputs(",\"step\":", out);
    write_json_string(out, failed.step);
    if (failed.errnum) fprintf(out, ",\"errno\":%d", failed.errnum);
    else fputs(",\"errno\":null", out);
    fputs(",\"phase\":", out);
    if (phase) write_json_string(out, phase); else fputs("null", out);
    fputs("}}\n", out);
    fclose(out);
    write_line(fd, text, length);
    free(text);
}

/* ---------------------------------------------------------------------------------------
 * Slots (plan.Ref) and the state a plan's steps share */

#define NONE LLONG_MIN

typedef struct { char *name; long long value, extra; } slot;
static slot slots[64];
static int slot_count;

typedef struct { int stdin_, stdout_, stderr_, setup, status; } child_fds;
static child_fds fds = {-1, -1, -1, -1, -1};
static int parent_pidfd = -1;

static slot *find_slot(const char *name) {
    for (int i = 0; i < slot_count; i++)
        if (!strcmp(slots[i].name, name)) return &slots[i];
    return NULL;
}

static void save_slot(const char *name, long long value, long long extra) {
    slot *s = find_slot(name);
    if (!s && slot_count < 64) {
        s = &slots[slot_count++];
        s->name = strdup(name);
    }
    if (s) { s->value = value; s->extra = extra; }
}

/* An argument as a number: an int, a bool, null (NONE) or a Ref to a slot. */
static long long number(const json *v) {
    const char *ref = ref_of(v);
    if (ref) {
        slot *s = find_slot(ref);
        return s ? s->value : NONE;
    }
    return v->type == 'n' ? NONE : v->num;
}

/* ---------------------------------------------------------------------------------------
 * Small helpers of the actions */

static int write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = write(fd, text, strlen(text));
    int saved = errno;
    close(fd);
    errno = saved;
    return n < 0 ? -1 : 0;
}

static int arm_parent_death_signal(int pidfd) {
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0) return -1;
    struct pollfd p = {pidfd, POLLIN, 0};
    if (poll(&p, 1, 0) > 0) _exit(1);  /* it died before that was armed */
    return 0;
}

static int compare_ints(const void *a, const void *b) {
    return *(const int *)a - *(const int *)b;
}

/* Close every fd from 3 up but `keep`. */
static void close_fds_except(int *keep, int count) {
    qsort(keep, count, sizeof *keep, compare_ints);
    unsigned low = 3;
    for (int i = 0; i < count; i++) {
        if (keep[i] < (int)low) continue;
        if (keep[i] > (int)low) syscall(SYS_close_range, low, keep[i] - 1, 0);
        low = keep[i] + 1;
    }
    syscall(SYS_close_range, low, ~0U, 0);
}

static char *layer_path(long long layer_fd, char *buffer, size_t size) {
    if (layer_fd == NONE) snprintf(buffer, size, "/");
    else snprintf(buffer, size, "/proc/self/fd/%lld", layer_fd);
    return buffer;
}

static int mount_tmpfs(const char *target, const char *options, unsigned long extra) {
    return mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV | extra, options);
}

/* The flags of the mount at `path`, which a remount must repeat (see mounts.py). */
static unsigned long statvfs_mount_flags(const char *path) {
    struct statvfs info;
    if (statvfs(path, &info) < 0) return 0;
    static const unsigned long pairs[][2] = {
        {ST_RDONLY, MS_RDONLY}, {ST_NOSUID, MS_NOSUID}, {ST_NODEV, MS_NODEV},
        {ST_NOEXEC, MS_NOEXEC}, {ST_NOATIME, MS_NOATIME}, {ST_NODIRATIME, MS_NODIRATIME},
        {ST_RELATIME, MS_RELATIME}};
    unsigned long flags = 0;
    for (size_t i = 0; i < sizeof pairs / sizeof *pairs; i++)
        if (info.f_flag & pairs[i][0]) flags |= pairs[i][1];
    return flags;
}

/* The host-side path of a mount point inside the new root, created if missing; no component
 * may be a symlink (runc's CVE-2021-30465: see mounts.py). */
static int mount_point(const char *container_path, int is_dir, char *path, size_t size) {
    char step[600];
    snprintf(step, sizeof step, "mount on %s", container_path);
    snprintf(path, size, "/newroot");
    const char *part = container_path;
    while (*part) {
        while (*part == '/') part++;
        if (!*part) break;
        const char *end = strchrnul(part, '/');
        size_t used = strlen(path);
        snprintf(path + used, size - used, "/%.*s", (int)(end - part), part);
        const char *rest = end;
        while (*rest == '/') rest++;
        int last = !*rest;
        struct stat info;
        if (lstat(path, &info) == 0) {
            if (S_ISLNK(info.st_mode))
                return fail_with("ContainerSetupError", step, ELOOP,
                                 "mount point %s: /%.*s is a symlink in the rootfs; mount "
                                 "points must be real directories", container_path,
                                 (int)(strlen(path) - strlen("/newroot/")),
                                 path + strlen("/newroot/"));
        } else {
            int made = last && !is_dir ? open(path, O_CREAT | O_WRONLY | O_CLOEXEC, 0644)
                                       : mkdir(path, 0755);
            if (made < 0)
                return fail_with("ContainerSetupError", step, errno,
                                 "create mount point %s: %s", container_path, strerror(errno));
            if (last && !is_dir) close(made);
        }
        part = end;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * The actions, by executor.ACTIONS name. Each returns 0, or -1 with `failed` set (by fail()
 * for a named sub-step, or errno left for the step itself: see carry_out). */

typedef struct { json **args; int count; long long result; int has_result; } call;

#define ARG(i) (c->args[i])
#define STR(i) (c->args[i]->str)
#define NUM(i) number(c->args[i])
#define RETURN(value) do { c->result = (value); c->has_result = 1; return 0; } while (0)
#define SUB(step, expression) do { if ((expression) < 0) return fail(step, errno); } while (0)

static int do_write_file(call *c) { return write_file(STR(0), STR(1)); }
static int do_unshare(call *c) { return unshare(NUM(0)); }
static int do_setns(call *c) { return setns(NUM(0), NUM(1)); }
static int do_set_dumpable(call *c) { return prctl(PR_SET_DUMPABLE, NUM(0) ? 1 : 0, 0, 0, 0); }
static int do_chdir(call *c) { return chdir(STR(0)); }
static int do_nothing(call *c) { RETURN(NONE); }
static int do_set_hostname(call *c) { return sethostname(STR(0), strlen(STR(0))); }

static int set_link_up(const char *name) {
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0) return -1;
    struct ifreq request = {0};
    snprintf(request.ifr_name, IFNAMSIZ, "%s", name);
    int result = ioctl(sock, SIOCGIFFLAGS, &request);
    if (result == 0) {
        request.ifr_flags |= IFF_UP;
        result = ioctl(sock, SIOCSIFFLAGS, &request);
    }
    int saved = errno;
    close(sock);
    errno = saved;
    return result;
}

static int do_set_link_up(call *c) { return set_link_up(STR(0)); }

static int do_open_low_ports_and_ping(call *c) {
    (void)c;
    if (write_file("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0") < 0) return -1;
    return write_file("/proc/sys/net/ipv4/ping_group_range", "0 2147483647");
}

static int do_own_network(call *c) {
    if (unshare(CLONE_NEWNET) < 0) return -1;
    return strcmp(STR(0), "loopback") ? 0 : set_link_up("lo");
}

static int do_map_own_ids(call *c) {
    char text[64];
    if (write_file("/proc/self/setgroups", "deny") < 0) return -1;
    snprintf(text, sizeof text, "0 %lld 1\n", NUM(0));
    if (write_file("/proc/self/uid_map", text) < 0) return -1;
    snprintf(text, sizeof text, "0 %lld 1\n", NUM(1));
    return write_file("/proc/self/gid_map", text);
}

static int do_wait_for_id_maps(call *c) {
    char answer = 0;
    if (write(NUM(0), "1", 1) < 0) return -1;
    if (read(NUM(1), &answer, 1) != 1 || answer != '1')
        return fail_with("ContainerSetupError", "write uid/gid maps", 0,
                         "the launcher could not map the container's ids");
    close(NUM(0));
    close(NUM(1));
    return 0;
}

static void write_status(int fd, const char *key, long long value) {
    char text[64];
    int length = snprintf(text, sizeof text, "{\"%s\":%lld}\n", key, value);
    write_line(fd, text, length);
}

static int do_fork_init_under_keeper(call *c) {
    (void)c;
    int keeper_pidfd = syscall(SYS_pidfd_open, getpid(), 0);
    if (keeper_pidfd < 0) return -1;
    pid_t init_pid = fork();
    if (init_pid < 0) return -1;
    if (init_pid == 0) {
        int keep[] = {fds.stdin_, fds.stdout_, fds.stderr_, fds.setup, fds.status, keeper_pidfd};
        arm_parent_death_signal(keeper_pidfd);
        close_fds_except(keep, 6);
        close(keeper_pidfd);
        return 0;
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

static int do_install_signal_forwarder(call *c) {
    (void)c;
    /* forwarded signals stay blocked since the zygote; the init waits for them (sigwait) */
    RETURN(NONE);
}

static int do_arm_parent_death_signal(call *c) { return arm_parent_death_signal(NUM(0)); }

static int do_enter_user_namespace(call *c) {
    if (setns(NUM(0), CLONE_NEWUSER) < 0 || setgroups(0, NULL) < 0 || setresgid(0, 0, 0) < 0
        || setresuid(0, 0, 0) < 0)
        return -1;
    return prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);  /* an id change resets it */
}

static int do_watch_host_mounts(call *c) {
    int namespace = open("/proc/self/ns/mnt", O_RDONLY | O_CLOEXEC);
    int table = open("/proc/self/mountinfo", O_RDONLY | O_CLOEXEC);
    if (namespace < 0 || table < 0) return -1;
    c->result = namespace;
    c->has_result = 1;
    save_slot("host mounts table", table, 0);
    return 0;
}

static int do_make_mounts_private(call *c) {
    (void)c;
    return mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL);
}

static int do_mount_stage(call *c) {
    (void)c;
    SUB("mount tmpfs stage on /tmp",
        mount("minictr", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700"));
    static const char *dirs[] = {"upper", "work", "newroot", "oldroot", "proc", "dev"};
    char path[64];
    for (size_t i = 0; i < sizeof dirs / sizeof *dirs; i++) {
        snprintf(path, sizeof path, "/tmp/%s", dirs[i]);
        if (mkdir(path, 0755) < 0) return -1;
    }
    return 0;
}

static int do_enter_stage(call *c) {
    (void)c;
    if (chdir("/tmp") < 0 || syscall(SYS_pivot_root, ".", "oldroot") < 0) return -1;
    return chdir("/");
}

static int do_mount_proc(call *c) {
    (void)c;
    return mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
}

static int do_mount_dev(call *c) {
    char path[256], source[256], step[300];
    SUB("mount /dev", mount("minictr-dev", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC | MS_NODEV,
                            "mode=0755,size=1m"));
    json *nodes = ARG(0), *links = ARG(1);
    unsigned long flags = NUM(2);
    for (int i = 0; i < nodes->count; i++) {
        const char *name = nodes->items[i]->str;
        snprintf(path, sizeof path, "/dev/%s", name);
        snprintf(source, sizeof source, "/oldroot/dev/%s", name);
        snprintf(step, sizeof step, "bind /dev/%s", name);
        int fd = open(path, O_CREAT | O_WRONLY | O_CLOEXEC, 0666);
        if (fd < 0) return -1;
        close(fd);
        SUB(step, mount(source, path, NULL, MS_BIND, NULL));
        SUB(step, mount(NULL, path, NULL, MS_REMOUNT | MS_BIND | flags, NULL));
    }
    for (int i = 0; i < links->count; i++) {
        json *pair = links->items[i];
        snprintf(path, sizeof path, "/dev/%s", pair->items[0]->str);
        if (symlink(pair->items[1]->str, path) < 0) return -1;
    }
    if (mkdir("/dev/pts", 0755) < 0) return -1;
    SUB("mount /dev/pts", mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
                                "newinstance,ptmxmode=0666,mode=0620"));
    if (mkdir("/dev/shm", 01777) < 0) return -1;
    SUB("mount /dev/shm", mount_tmpfs("/dev/shm", "mode=1777,size=64m", MS_NOEXEC));
    return 0;
}

static int bind_read_only(const char *path) {
    if (mount(path, path, NULL, MS_BIND | MS_REC, NULL) < 0) return -1;
    return mount(NULL, path, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
                 | MS_NOEXEC, NULL);
}

static int do_mask_proc(call *c) {
    char path[256], step[300];
    json *masked = ARG(0), *read_only = ARG(1);
    struct stat info;
    for (int i = 0; i < masked->count; i++) {
        const char *name = masked->items[i]->str;
        snprintf(path, sizeof path, "/proc/%s", name);
        snprintf(step, sizeof step, "mask /proc/%s", name);
        if (stat(path, &info) < 0) continue;
        if (S_ISDIR(info.st_mode))
            SUB(step, mount_tmpfs(path, "size=0,mode=0555", MS_RDONLY));
        else
            SUB(step, mount("/oldroot/dev/null", path, NULL, MS_BIND, NULL));
    }
    for (int i = 0; i < read_only->count; i++) {
        const char *name = read_only->items[i]->str;
        snprintf(path, sizeof path, "/proc/%s", name);
        snprintf(step, sizeof step, "bind /proc/%s read-only", name);
        if (stat(path, &info) == 0) SUB(step, bind_read_only(path));
    }
    return 0;
}

static int do_open_host_path(call *c) {
    if (ARG(0)->type == 'n') RETURN(NONE);
    char path[4096];
    snprintf(path, sizeof path, "/oldroot%s", STR(0));
    int fd = open(path, O_PATH | O_CLOEXEC);
    if (fd < 0) {
        char step[4200];
        snprintf(step, sizeof step, "open %s", STR(0));
        return fail(step, errno);
    }
    RETURN(fd);
}

static int do_lock_layer(call *c) {
    long long layer = NUM(0);
    if (layer == NONE) RETURN(NONE);
    char path[64];
    int fd = open(layer_path(layer, path, sizeof path), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return -1;
    /* the previous user of the layer may still be exiting: it gets a moment */
    for (int waited = 0; flock(fd, LOCK_EX | LOCK_NB) < 0; waited++) {
        if (errno != EWOULDBLOCK) return -1;
        if (waited >= 2000)
            return fail_with("ContainerSetupError", "lock the layer", EBUSY,
                             "the layer directory is in use by another running container; "
                             "give each running container its own");
        usleep(1000);
    }
    RETURN(fd);
}

static int do_make_layer_dirs(call *c) {
    char layer[64], path[128], step[64];
    static const char *names[] = {"upper", "work"};
    for (int i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "%s/%s", layer_path(NUM(0), layer, sizeof layer), names[i]);
        snprintf(step, sizeof step, "create the layer's %s dir", names[i]);
        struct stat info;
        if (mkdir(path, 0755) < 0 && !(errno == EEXIST && stat(path, &info) == 0
                                       && S_ISDIR(info.st_mode)))
            return fail(step, errno);
    }
    return 0;
}

static int do_size_stage(call *c) {
    if (NUM(0) == NONE) return 0;
    char options[64];
    snprintf(options, sizeof options, "size=%lld", NUM(0));
    return mount(NULL, "/", NULL, MS_REMOUNT | MS_NOSUID | MS_NODEV, options);
}

static int measure_filesystem(const char *path, long long *size) {
    struct statvfs info;
    if (statvfs(path, &info) < 0) return -1;
    *size = (long long)info.f_blocks * info.f_frsize;
    return 0;
}

static int do_measure_layer(call *c) {
    char path[64];
    long long size;
    if (measure_filesystem(layer_path(NUM(0), path, sizeof path), &size) < 0) return -1;
    RETURN(size);
}

static int do_measure_filesystem(call *c) {
    long long size;
    if (measure_filesystem(STR(0), &size) < 0) return -1;
    RETURN(size);
}

static int do_idmapped(call *c) {
    long long rootfs = NUM(0), userns = NUM(1), host_uid = NUM(2);
    struct stat info;
    if (fstat(rootfs, &info) < 0) return -1;
    if (info.st_uid == host_uid) RETURN(rootfs);
    int tree = syscall(SYS_open_tree, (int)rootfs, "", OPEN_TREE_CLONE_ | AT_RECURSIVE_
                       | AT_EMPTY_PATH | O_CLOEXEC);
    if (tree >= 0) {
        uint64_t attr[4] = {MOUNT_ATTR_IDMAP_, 0, 0, (uint64_t)userns};  /* struct mount_attr */
        if (syscall(SYS_mount_setattr, tree, "", AT_EMPTY_PATH, attr, sizeof attr) == 0)
            RETURN(tree);
        int saved = errno;
        close(tree);
        errno = saved;
    }
    /* where the kernel or the filesystem cannot idmap, the base stays as it is */
    if (errno == EINVAL || errno == EPERM || errno == ENOSYS || errno == EOPNOTSUPP)
        RETURN(rootfs);
    return fail("idmap the rootfs", errno);
}

static int do_chown_layer(call *c) {
    char layer[64], path[128];
    snprintf(path, sizeof path, "%s/upper", layer_path(NUM(0), layer, sizeof layer));
    return chown(path, NUM(1), NUM(2));
}

static int do_mount_overlay(call *c) {
    char layer[64], options[512];
    layer_path(NUM(1), layer, sizeof layer);
    snprintf(options, sizeof options, "lowerdir=/proc/self/fd/%lld,upperdir=%s/upper,"
             "workdir=%s/work%s", NUM(0), layer, layer, NUM(2) ? ",userxattr" : "");
    return mount("overlay", "/newroot", "overlay", MS_NOSUID | MS_NODEV, options);
}

static int do_move_into_root(call *c) {
    char point[4096];
    if (mount_point(STR(0), 1, point, sizeof point) < 0) return -1;
    return mount(STR(0), point, NULL, MS_MOVE, NULL);
}

static int mount_tmp_at(const char *target, long long size) {
    char point[4096], options[64] = "mode=1777";
    if (mount_point(target, 1, point, sizeof point) < 0) return -1;
    if (size != NONE && size) snprintf(options, sizeof options, "mode=1777,size=%lld", size);
    return mount_tmpfs(point, options, 0);
}

static int do_mount_tmp(call *c) { return mount_tmp_at("/tmp", NUM(0)); }
static int do_mount_user_tmpfs(call *c) { return mount_tmp_at(STR(0), NUM(1)); }

/* Remount `top` and every mount below it with `extra` added. */
static int restrict_mount_tree(const char *top, unsigned long extra) {
    if (mount(NULL, top, NULL, MS_REMOUNT | MS_BIND | statvfs_mount_flags(top) | extra, NULL))
        return -1;
    FILE *table = fopen("/proc/self/mountinfo", "re");
    if (!table) return -1;
    char line[8192], point[4096];
    size_t length = strlen(top);
    int result = 0;
    while (result == 0 && fgets(line, sizeof line, table)) {
        if (sscanf(line, "%*s %*s %*s %*s %4095s", point) != 1) continue;
        for (char *space; (space = strstr(point, "\\040"));) {
            *space = ' ';
            memmove(space + 1, space + 4, strlen(space + 4) + 1);
        }
        if (!strncmp(point, top, length) && point[length] == '/')
            result = mount(NULL, point, NULL, MS_REMOUNT | MS_BIND | statvfs_mount_flags(point)
                           | extra, NULL);
    }
    int saved = errno;
    fclose(table);
    errno = saved;
    return result;
}

static int do_bind_user_mount(call *c) {
    char source[64], point[4096], step[4200];
    snprintf(source, sizeof source, "/proc/self/fd/%lld", NUM(0));
    struct stat info;
    int is_dir = stat(source, &info) == 0 && S_ISDIR(info.st_mode);
    if (mount_point(STR(1), is_dir, point, sizeof point) < 0) return -1;
    if (mount(source, point, NULL, MS_BIND | MS_REC, NULL) < 0) return -1;
    snprintf(step, sizeof step, "restrict %s", STR(1));
    SUB(step, restrict_mount_tree(point, MS_NOSUID | MS_NODEV | (NUM(2) ? MS_RDONLY : 0)));
    return 0;
}

static int do_close_fds(call *c) {
    for (int i = 0; i < c->count; i++)
        if (NUM(i) != NONE) close(NUM(i));
    return 0;
}

static int do_enter_root(call *c) {
    (void)c;
    if (chdir("/newroot") < 0) return -1;
    SUB("pivot_root", syscall(SYS_pivot_root, ".", "."));
    SUB("detach the old root", umount2(".", MNT_DETACH));
    return chdir("/");
}

static const struct { const char *name; int resource; } rlimit_names[] = {
    {"as", RLIMIT_AS}, {"core", RLIMIT_CORE}, {"cpu", RLIMIT_CPU}, {"data", RLIMIT_DATA},
    {"fsize", RLIMIT_FSIZE}, {"locks", RLIMIT_LOCKS}, {"memlock", RLIMIT_MEMLOCK},
    {"msgqueue", RLIMIT_MSGQUEUE}, {"nice", RLIMIT_NICE}, {"nofile", RLIMIT_NOFILE},
    {"nproc", RLIMIT_NPROC}, {"rss", RLIMIT_RSS}, {"rtprio", RLIMIT_RTPRIO},
    {"rttime", RLIMIT_RTTIME}, {"sigpending", RLIMIT_SIGPENDING}, {"stack", RLIMIT_STACK}};

static int set_rlimit(const char *name, long long soft, long long hard) {
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

static int do_set_rlimits(call *c) {
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

static int do_join_new_session_keyring(call *c) {
    (void)c;
    return syscall(SYS_keyctl, 1 /* KEYCTL_JOIN_SESSION_KEYRING */, NULL) < 0 ? -1 : 0;
}

static int do_drop_capabilities(call *c) {
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

static int do_install_seccomp_filter(call *c) {
    /* args: the allowed names (Python's cache key) and the program Python built, in hex */
    const char *hex = STR(1);
    size_t size = strlen(hex) / 2;
    unsigned char *program = malloc(size + 8);
    if (!program) return -1;
    for (size_t i = 0; i < size; i++) sscanf(hex + 2 * i, "%2hhx", &program[i]);
    struct { unsigned short len; void *filter; } fprog = {size / 8, program};
    return prctl(PR_SET_SECCOMP, 2 /* SECCOMP_MODE_FILTER */, &fprog, 0, 0);
}

/* -- the command ---------------------------------------------------------------------- */

/* The program `name` names, found on PATH as Python's init.find_program does. */
static int find_program(const char *name, const char *search, char *found, size_t size) {
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

static int exec_failure(const char *program, int errnum) {
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

/* Spawn the command: a new session (CVE-2017-5226), stdio, default signals, an empty mask,
 * and no other fd (CVE-2024-21626). */
static pid_t spawn_command(json *argv_json, json *env_json) {
    int argc = argv_json->count, envc = env_json->count;
    char **argv = calloc(argc + 1, sizeof *argv), **envp = calloc(envc + 1, sizeof *envp);
    const char *path = "";
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

static sigset_t waited_signals;  /* forwarded ones and SIGCHLD: blocked, taken by sigwait */

static void report_end(int status_fd, int wait_status) {
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
static int reap_until(pid_t command) {
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

static int do_run_command_as_init(call *c) {
    pid_t command = spawn_command(ARG(0), ARG(1));
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

static int do_run_command_beside(call *c) {
    pid_t command = spawn_command(ARG(0), ARG(1));
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

static int do_renew_stage_if_stale(call *c);

static const struct { const char *name; int (*run)(call *); } actions[] = {
    {"write_file", do_write_file}, {"unshare", do_unshare}, {"setns", do_setns},
    {"set_dumpable", do_set_dumpable}, {"set_link_up", do_set_link_up},
    {"set_hostname", do_set_hostname}, {"chdir", do_chdir}, {"nothing", do_nothing},
    {"open_low_ports_and_ping", do_open_low_ports_and_ping}, {"own_network", do_own_network},
    {"map_own_ids", do_map_own_ids}, {"wait_for_id_maps", do_wait_for_id_maps},
    {"fork_init_under_keeper", do_fork_init_under_keeper},
    {"enter_user_namespace", do_enter_user_namespace},
    {"arm_parent_death_signal", do_arm_parent_death_signal},
    {"install_signal_forwarder", do_install_signal_forwarder},
    {"watch_host_mounts", do_watch_host_mounts}, {"make_mounts_private", do_make_mounts_private},
    {"mount_stage", do_mount_stage}, {"enter_stage", do_enter_stage},
    {"mount_proc", do_mount_proc}, {"mount_dev", do_mount_dev}, {"mask_proc", do_mask_proc},
    {"open_host_path", do_open_host_path}, {"lock_layer", do_lock_layer},
    {"size_stage", do_size_stage}, {"measure_layer", do_measure_layer},
    {"measure_filesystem", do_measure_filesystem}, {"idmapped", do_idmapped},
    {"make_layer_dirs", do_make_layer_dirs}, {"chown_layer", do_chown_layer},
    {"mount_overlay", do_mount_overlay}, {"move_into_root", do_move_into_root},
    {"mount_tmp", do_mount_tmp}, {"mount_user_tmpfs", do_mount_user_tmpfs},
    {"bind_user_mount", do_bind_user_mount}, {"close_fds", do_close_fds},
    {"enter_root", do_enter_root}, {"set_rlimits", do_set_rlimits},
    {"join_new_session_keyring", do_join_new_session_keyring},
    {"drop_capabilities", do_drop_capabilities},
    {"install_seccomp_filter", do_install_seccomp_filter},
    {"run_command_as_init", do_run_command_as_init},
    {"run_command_beside", do_run_command_beside},
    {"renew_stage_if_stale", do_renew_stage_if_stale},
};

/* ---------------------------------------------------------------------------------------
 * The executor: a plan's steps, in order */

/* step: [phase, name, action, [args...], saves] */
static json *done[128];
static int done_count;
static const char *failed_phase;

static int carry_out(json *step) {
    const char *phase = step->items[0]->str, *name = step->items[1]->str;
    const char *action = step->items[2]->str;
    json *args = step->items[3], *saves = step->items[4];
    call c = {args->items, args->count, NONE, 0};
    failed.type = NULL;
    failed_phase = phase;
    for (size_t i = 0; i < sizeof actions / sizeof *actions; i++) {
        if (strcmp(actions[i].name, action)) continue;
        errno = 0;
        if (actions[i].run(&c) < 0) {
            if (!failed.type) fail(name, errno ? errno : EINVAL);
            return -1;
        }
        if (saves->type == 's') save_slot(saves->str, c.has_result ? c.result : NONE, 0);
        if (done_count < 128) done[done_count++] = step;
        return 0;
    }
    fail_with("ContainerSetupError", name, ENOSYS, "%s: no native action %s", name, action);
    return -1;
}

static int run_plan(json *plan) {
    for (int i = 0; i < plan->count; i++)
        if (carry_out(plan->items[i]) < 0) return -1;
    return 0;
}

/* If the host's mounts changed since the stage copied them, go back to the host's mount
 * namespace and carry out the stage's steps again (see executor._renew_stage_if_stale). */
static int do_renew_stage_if_stale(call *c) {
    long long namespace = NUM(0);
    slot *table = find_slot("host mounts table");
    if (namespace == NONE || !table) return 0;
    struct pollfd p = {table->value, POLLPRI, 0};
    if (poll(&p, 1, 0) > 0) {
        SUB("rejoin the host's mount namespace", setns(namespace, CLONE_NEWNS));
        int count = done_count;
        for (int i = 0; i < count; i++) {
            json *step = done[i];
            const char *phase = step->items[0]->str;
            if ((!strcmp(phase, "stage") || !strcmp(phase, "/proc and /dev"))
                && step->items[4]->type == 'n') {
                if (carry_out(step) < 0) return -1;
            }
        }
        failed_phase = "layer";
    }
    close(namespace);
    close(table->value);
    return 0;
}

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
    if (argc == 2 && !strcmp(argv[1], "actions")) {
        for (size_t i = 0; i < sizeof actions / sizeof *actions; i++) puts(actions[i].name);
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
