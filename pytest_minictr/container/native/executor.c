/* The plan side of the native core: JSON (the subset plans and orders use), failures in
 * container/failure.py's format, the slots of plan.Ref, and the executor (one function per
 * action of container/executor.py, in `actions`). */
#include "minictr_init.h"

/* ---------------------------------------------------------------------------------------
 * JSON, the subset a plan and the launcher's messages use */

void skip_space(const char **p) { while (isspace((unsigned char)**p)) (*p)++; }

json *new_json(char type) {
    json *v = calloc(1, sizeof *v);
    if (!v) _exit(121);
    v->type = type;
    return v;
}

void put_utf8(char **out, unsigned code) {
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

char *parse_string(const char **p) {
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

json *parse_list(const char **p, char type, char close) {
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

json *parse_value(const char **p) {
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

void free_json(json *v) {
    for (int i = 0; i < v->count; i++) free_json(v->items[i]);
    free(v->items);
    free(v->str);
    free(v);
}

/* The value of {"ref": slot}, or NULL for anything else. */
const char *ref_of(const json *v) {
    if (v->type == 'o' && v->count == 2 && !strcmp(v->items[0]->str, "ref"))
        return v->items[1]->str;
    return NULL;
}

void write_json_string(FILE *out, const char *s) {
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

void write_line(int fd, const char *text, size_t length) {
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

failure failed;

/* Record that `step` failed with errno `errnum`: "<step>: <strerror>". Returns -1. */
int fail(const char *step, int errnum) {
    failed.type = "ContainerSetupError";
    snprintf(failed.step, sizeof failed.step, "%s", step);
    snprintf(failed.message, sizeof failed.message, "%s: %s", step, strerror(errnum));
    failed.errnum = errnum;
    return -1;
}

int fail_with(const char *type, const char *step, int errnum, const char *format, ...) {
    va_list args;
    va_start(args, format);
    failed.type = type;
    snprintf(failed.step, sizeof failed.step, "%s", step);
    vsnprintf(failed.message, sizeof failed.message, format, args);
    failed.errnum = errnum;
    va_end(args);
    return -1;
}

void report_failure(int fd, const char *phase) {
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

static slot slots[64];
static int slot_count;

child_fds fds = {-1, -1, -1, -1, -1};
int parent_pidfd = -1;

slot *find_slot(const char *name) {
    for (int i = 0; i < slot_count; i++)
        if (!strcmp(slots[i].name, name)) return &slots[i];
    return NULL;
}

void save_slot(const char *name, long long value, long long extra) {
    slot *s = find_slot(name);
    if (!s && slot_count < 64) {
        s = &slots[slot_count++];
        s->name = strdup(name);
    }
    if (s) { s->value = value; s->extra = extra; }
}

/* An argument as a number: an int, a bool, null (NONE) or a Ref to a slot. */
long long number(const json *v) {
    const char *ref = ref_of(v);
    if (ref) {
        slot *s = find_slot(ref);
        return s ? s->value : NONE;
    }
    return v->type == 'n' ? NONE : v->num;
}

#define ACTION_ENTRY(name) {#name, do_##name},
static const struct { const char *name; int (*run)(call *); } actions[] = {
    MINICTR_ACTIONS(ACTION_ENTRY)
};
#undef ACTION_ENTRY

/* ---------------------------------------------------------------------------------------
 * The executor: a plan's steps, in order */

/* step: [phase, name, action, [args...], saves] */
static json *done[128];
static int done_count;
const char *failed_phase;

int carry_out(json *step) {
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

int run_plan(json *plan) {
    for (int i = 0; i < plan->count; i++)
        if (carry_out(plan->items[i]) < 0) return -1;
    return 0;
}

/* If the host's mounts changed since the stage copied them, go back to the host's mount
 * namespace and carry out the stage's steps again (see executor._renew_stage_if_stale). */
int do_renew_stage_if_stale(call *c) {
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

void print_actions(void) {
    for (size_t i = 0; i < sizeof actions / sizeof *actions; i++) puts(actions[i].name);
}
