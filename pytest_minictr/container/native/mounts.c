/* The mount steps of a plan: the stage, /proc and /dev, the layer, the root, pivot_root, as
 * container/mounts.py does them (its docstring gives the order and the reasons). */
#include "minictr_init.h"

char *layer_path(long long layer_fd, char *buffer, size_t size) {
    if (layer_fd == NONE) snprintf(buffer, size, "/");
    else snprintf(buffer, size, "/proc/self/fd/%lld", layer_fd);
    return buffer;
}

int mount_tmpfs(const char *target, const char *options, unsigned long extra) {
    return mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV | extra, options);
}

/* The flags of the mount at `path`, which a remount must repeat (see mounts.py). */
unsigned long statvfs_mount_flags(const char *path) {
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
int mount_point(const char *container_path, int is_dir, char *path, size_t size) {
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

int do_watch_host_mounts(call *c) {
    int namespace = open("/proc/self/ns/mnt", O_RDONLY | O_CLOEXEC);
    int table = open("/proc/self/mountinfo", O_RDONLY | O_CLOEXEC);
    if (namespace < 0 || table < 0) return -1;
    c->result = namespace;
    c->has_result = 1;
    save_slot("host mounts table", table, 0);
    return 0;
}

int do_make_mounts_private(call *c) {
    (void)c;
    return mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL);
}

int do_mount_stage(call *c) {
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

int do_enter_stage(call *c) {
    (void)c;
    if (chdir("/tmp") < 0 || syscall(SYS_pivot_root, ".", "oldroot") < 0) return -1;
    return chdir("/");
}

int do_mount_proc(call *c) {
    (void)c;
    return mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
}

int do_mount_dev(call *c) {
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

int bind_read_only(const char *path) {
    if (mount(path, path, NULL, MS_BIND | MS_REC, NULL) < 0) return -1;
    return mount(NULL, path, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
                 | MS_NOEXEC, NULL);
}

int do_mask_proc(call *c) {
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

int do_open_host_path(call *c) {
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

int do_lock_layer(call *c) {
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

int do_make_layer_dirs(call *c) {
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

int do_size_stage(call *c) {
    if (NUM(0) == NONE) return 0;
    char options[64];
    snprintf(options, sizeof options, "size=%lld", NUM(0));
    return mount(NULL, "/", NULL, MS_REMOUNT | MS_NOSUID | MS_NODEV, options);
}

int measure_filesystem(const char *path, long long *size) {
    struct statvfs info;
    if (statvfs(path, &info) < 0) return -1;
    *size = (long long)info.f_blocks * info.f_frsize;
    return 0;
}

int do_measure_layer(call *c) {
    char path[64];
    long long size;
    if (measure_filesystem(layer_path(NUM(0), path, sizeof path), &size) < 0) return -1;
    RETURN(size);
}

int do_measure_filesystem(call *c) {
    long long size;
    if (measure_filesystem(STR(0), &size) < 0) return -1;
    RETURN(size);
}

int do_idmapped(call *c) {
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

int do_chown_layer(call *c) {
    char layer[64], path[128];
    snprintf(path, sizeof path, "%s/upper", layer_path(NUM(0), layer, sizeof layer));
    return chown(path, NUM(1), NUM(2));
}

/* args: the layer, userxattr, then the lower dirs' fds, top first (see mounts.py) */
int do_mount_overlay(call *c) {
    char layer[64], lower[3072] = "", options[4096];
    size_t used = 0;
    layer_path(NUM(0), layer, sizeof layer);
    for (int i = 2; i < c->count; i++) {
        int n = snprintf(lower + used, sizeof lower - used, "%s/proc/self/fd/%lld",
                         i > 2 ? ":" : "", NUM(i));
        if (n < 0 || (size_t)n >= sizeof lower - used)
            return fail_with("ContainerSetupError", "mount overlay of the rootfs", E2BIG,
                             "too many layers for one overlay (%d)", c->count - 2);
        used += n;
    }
    snprintf(options, sizeof options, "lowerdir=%s,upperdir=%s/upper,workdir=%s/work%s",
             lower, layer, layer, NUM(1) ? ",userxattr" : "");
    return mount("overlay", "/newroot", "overlay", MS_NOSUID | MS_NODEV, options);
}

/* see mounts.bind_text_file: a file of the stage bound over the image's own */
int do_bind_text_file(call *c) {
    const char *text = STR(0), *target = STR(1);
    char path[4096] = "/newroot", staged[512], point[4096];
    struct stat info;
    for (const char *part = target; *part;) {
        while (*part == '/') part++;
        const char *end = strchrnul(part, '/');
        size_t used = strlen(path);
        snprintf(path + used, sizeof path - used, "/%.*s", (int)(end - part), part);
        if (lstat(path, &info) == 0 && S_ISLNK(info.st_mode)) return 0;  /* the image's own */
        part = end;
    }
    if (mount_point(target, 0, point, sizeof point) < 0) {
        /* a root whose /etc container root may not write (a root-owned rootfs, without
         * root): it keeps its own files, if any */
        if (failed.errnum != EACCES && failed.errnum != EPERM && failed.errnum != EROFS)
            return -1;
        failed.type = NULL;
        return 0;
    }
    snprintf(staged, sizeof staged, "/%s", target + strspn(target, "/"));
    for (char *slash = strchr(staged + 1, '/'); slash; slash = strchr(slash, '/')) *slash = '-';
    int fd = open(staged, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return -1;
    size_t length = strlen(text);
    ssize_t written = write(fd, text, length);
    close(fd);
    if (written != (ssize_t)length) return -1;
    return mount(staged, point, NULL, MS_BIND, NULL);
}

int do_move_into_root(call *c) {
    char point[4096];
    if (mount_point(STR(0), 1, point, sizeof point) < 0) return -1;
    return mount(STR(0), point, NULL, MS_MOVE, NULL);
}

int mount_tmp_at(const char *target, long long size) {
    char point[4096], options[64] = "mode=1777";
    if (mount_point(target, 1, point, sizeof point) < 0) return -1;
    if (size != NONE && size) snprintf(options, sizeof options, "mode=1777,size=%lld", size);
    return mount_tmpfs(point, options, 0);
}

int do_mount_tmp(call *c) { return mount_tmp_at("/tmp", NUM(0)); }
int do_mount_user_tmpfs(call *c) { return mount_tmp_at(STR(0), NUM(1)); }

/* Remount `top` and every mount below it with `extra` added. */
int restrict_mount_tree(const char *top, unsigned long extra) {
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

int do_bind_user_mount(call *c) {
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

int do_close_fds(call *c) {
    for (int i = 0; i < c->count; i++)
        if (NUM(i) != NONE) close(NUM(i));
    return 0;
}

/* read_only=True: the root's own mount only; /tmp, /dev and the user's mounts keep theirs */
int do_make_root_read_only(call *c) {
    (void)c;
    return mount(NULL, "/newroot", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY
                 | statvfs_mount_flags("/newroot"), NULL);
}

int do_enter_root(call *c) {
    (void)c;
    if (chdir("/newroot") < 0) return -1;
    SUB("pivot_root", syscall(SYS_pivot_root, ".", "."));
    SUB("detach the old root", umount2(".", MNT_DETACH));
    return chdir("/");
}
