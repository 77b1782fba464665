/*
 * nvml_stub.c — a scripted stand-in for libnvidia-ml.so.1, for tests only.
 *
 * mentat-agent's GPU meter (agent/src/gpu.rs) loads NVML through nvml-wrapper,
 * which resolves each entry point lazily with dlsym: only the functions the
 * meter calls must exist. This library exports exactly those (plus
 * nvmlSystemGetDriverVersion, which nvml-wrapper calls once during init and
 * nvmlErrorString for completeness). It is a test fixture, not an emulator:
 * the answers come from a script, not from any model of a GPU.
 *
 * Build:  cc -shared -fPIC -o <dir>/libnvidia-ml.so.1 nvml_stub.c
 *
 * Where the script is: $NVML_STUB_SCRIPT if set, else `nvml-stub.script` in the
 * directory this library was loaded from (found with dladdr). The second form
 * lets tests running in parallel in one process each load their own copy of the
 * library from their own temp dir, with no process-wide environment variable.
 *
 * The current tick comes from one of two sources:
 *   - by default, the integer in `<script>.tick` (absent or empty: tick 0),
 *     which a test calling the meter itself writes before each sample;
 *   - with a `clock` line, the time since nvmlInit_v2: tick = elapsed ms /
 *     period, held at the last tick any line names. A test running the
 *     whole agent, whose ticks it does not control, uses this.
 * Either way the stub never guesses a tick from the order or number of calls
 * the meter makes. The tick is taken when the meter calls nvmlInit_v2,
 * nvmlDeviceGetCount_v2 (the start of an enumeration) or
 * nvmlDeviceGetHandleByUUID (the start of one device's reading), and every
 * other call answers for that tick: one enumeration, or one device's process
 * list, samples, utilization and energy, always come from a single tick, as
 * a clock tick falling between two calls would otherwise split them.
 *
 * Script format: one record per line, fields separated by spaces, `#` starts a
 * comment, blank lines ignored. A missing script, an unknown keyword or a
 * malformed line makes nvmlInit_v2 answer NVML_ERROR_UNKNOWN.
 *
 *   device <n> <uuid> <name> <mig 0|1> <procutil ok|unsupported> [<from> [<until>]]
 *       A GPU, present from tick <from> (default 0) until before tick <until>
 *       (default: never gone). <n> numbers the script's devices 0, 1, ... in
 *       order, and is what the lines below name; NVML's index is the
 *       device's rank among those present at the tick, so it shifts when an
 *       earlier device goes, as on a real node. procutil=unsupported makes
 *       nvmlDeviceGetProcessUtilization answer NVML_ERROR_NOT_SUPPORTED. A
 *       handle of a device that is gone answers NVML_ERROR_GPU_IS_LOST.
 *   clock <ms>
 *       Take the tick from the clock, <ms> milliseconds a tick (see above).
 * In the lines below, <device> is a device's <n>.
 *   util <tick> <device> <gpu%> <mem%>
 *       nvmlDeviceGetUtilizationRates during that tick (none: NOT_SUPPORTED).
 *   energy <tick> <device> <total mJ>
 *       nvmlDeviceGetTotalEnergyConsumption during that tick (none: NOT_SUPPORTED).
 *   proc <tick> <device> <pid> <compute|graphics> <used bytes> [<gpu instance id>]
 *       A running process listed during that tick.
 *   sample <tick> <device> <pid> <timestamp us> <sm%> <mem%>
 *       A per-process utilization sample that the "driver" buffered at that
 *       tick: returned from that tick on when its timestamp is newer than the
 *       caller's lastSeenTimeStamp. No newer sample: NVML_ERROR_NOT_FOUND, as
 *       the real library answers.
 *   error <tick> <function name|*> <nvmlReturn_t code>
 *       Every call of that function (or of any function except init/shutdown/
 *       nvmlErrorString) during that tick returns the code, e.g. 999 (UNKNOWN).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int nvmlReturn_t;
typedef struct stub_device *nvmlDevice_t;

enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_UNKNOWN = 999,
};

/* Layouts as in nvml.h (and nvml-wrapper-sys's bindings). */
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlProcessInfo_t;

typedef struct {
    unsigned int pid;
    unsigned long long timeStamp;
    unsigned int smUtil;
    unsigned int memUtil;
    unsigned int encUtil;
    unsigned int decUtil;
} nvmlProcessUtilizationSample_t;

typedef struct {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

#define MAX_DEVICES 8
#define MAX_ROWS 1024
#define NO_VALUE 0xFFFFFFFFu

struct stub_device {
    unsigned int number; /* the script's <n>, not NVML's index */
    char uuid[96];
    char name[96];
    unsigned int mig;
    int procutil_supported;
    long from, until;    /* present in [from, until); until < 0: never gone */
};

enum row_kind { ROW_UTIL, ROW_ENERGY, ROW_PROC, ROW_SAMPLE, ROW_ERROR };

struct row {
    enum row_kind kind;
    long tick;
    unsigned int device;
    unsigned int pid;
    int graphics;              /* ROW_PROC */
    unsigned long long value;  /* bytes, mJ, timestamp, or error code */
    unsigned int a, b;         /* util %, or gpu instance id */
    char function[64];         /* ROW_ERROR */
};

static struct stub_device devices[MAX_DEVICES];
static unsigned int device_count;
static struct row rows[MAX_ROWS];
static unsigned int row_count;
static int initialized;
static char script_path[PATH_MAX];
static long clock_ms;        /* > 0: clock mode */
static long last_tick;       /* the clock holds here */
static struct timespec init_time;
static long tick;            /* the tick taken at the last init/count/handle-by-UUID */

static int find_script(void) {
    const char *env = getenv("NVML_STUB_SCRIPT");
    if (env && *env) {
        snprintf(script_path, sizeof script_path, "%s", env);
        return 0;
    }
    Dl_info info;
    if (!dladdr((void *)find_script, &info) || !info.dli_fname) return -1;
    snprintf(script_path, sizeof script_path, "%s", info.dli_fname);
    char *slash = strrchr(script_path, '/');
    size_t dir_len = slash ? (size_t)(slash - script_path) + 1 : 0;
    snprintf(script_path + dir_len, sizeof script_path - dir_len, "nvml-stub.script");
    return 0;
}

static int load_script(void) {
    FILE *f = fopen(script_path, "r");
    if (!f) return -1;
    char line[512];
    device_count = 0;
    row_count = 0;
    clock_ms = 0;
    last_tick = 0;
    int bad = 0;
    while (fgets(line, sizeof line, f)) {
        char *hash = strchr(line, '#');
        if (hash) *hash = 0;
        char kw[32];
        if (sscanf(line, "%31s", kw) != 1) continue;
        struct row r;
        memset(&r, 0, sizeof r);
        r.a = NO_VALUE;
        if (!strcmp(kw, "device")) {
            struct stub_device d;
            char procutil[32];
            memset(&d, 0, sizeof d);
            d.until = -1;
            int n = sscanf(line, "%*s %u %95s %95s %u %31s %ld %ld", &d.number, d.uuid, d.name, &d.mig,
                           procutil, &d.from, &d.until);
            if (device_count >= MAX_DEVICES || n < 5 || d.number != device_count || d.from < 0 ||
                (d.until >= 0 && d.until <= d.from)) {
                bad = 1;
                continue;
            }
            d.procutil_supported = strcmp(procutil, "unsupported") != 0;
            if (d.from > last_tick) last_tick = d.from;
            if (d.until > last_tick) last_tick = d.until;
            devices[device_count++] = d;
            continue;
        }
        if (!strcmp(kw, "clock")) {
            if (sscanf(line, "%*s %ld", &clock_ms) != 1 || clock_ms <= 0) bad = 1;
            continue;
        }
        if (row_count >= MAX_ROWS) { bad = 1; continue; }
        if (!strcmp(kw, "util")) {
            r.kind = ROW_UTIL;
            if (sscanf(line, "%*s %ld %u %u %u", &r.tick, &r.device, &r.a, &r.b) != 4) bad = 1;
        } else if (!strcmp(kw, "energy")) {
            r.kind = ROW_ENERGY;
            if (sscanf(line, "%*s %ld %u %llu", &r.tick, &r.device, &r.value) != 3) bad = 1;
        } else if (!strcmp(kw, "proc")) {
            char type[32];
            r.kind = ROW_PROC;
            int n = sscanf(line, "%*s %ld %u %u %31s %llu %u", &r.tick, &r.device, &r.pid, type, &r.value, &r.a);
            if (n < 5) bad = 1;
            r.graphics = !strcmp(type, "graphics");
        } else if (!strcmp(kw, "sample")) {
            r.kind = ROW_SAMPLE;
            if (sscanf(line, "%*s %ld %u %u %llu %u %u", &r.tick, &r.device, &r.pid, &r.value, &r.a, &r.b) != 6) bad = 1;
        } else if (!strcmp(kw, "error")) {
            r.kind = ROW_ERROR;
            if (sscanf(line, "%*s %ld %63s %llu", &r.tick, r.function, &r.value) != 3) bad = 1;
        } else {
            bad = 1;
            continue;
        }
        if (r.tick > last_tick) last_tick = r.tick;
        rows[row_count++] = r;
    }
    fclose(f);
    return bad ? -1 : 0;
}

/* Takes the tick from the clock or the tick file (see the header). */
static void take_tick(void) {
    if (clock_ms > 0) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        long elapsed_ms = (now.tv_sec - init_time.tv_sec) * 1000 + (now.tv_nsec - init_time.tv_nsec) / 1000000;
        tick = elapsed_ms / clock_ms;
        if (tick > last_tick) tick = last_tick;
        return;
    }
    char path[PATH_MAX + 8];
    snprintf(path, sizeof path, "%s.tick", script_path);
    FILE *f = fopen(path, "r");
    tick = 0;
    if (!f) return;
    if (fscanf(f, "%ld", &tick) != 1) tick = 0;
    fclose(f);
}

static long current_tick(void) {
    return tick;
}

static int present(const struct stub_device *d) {
    long t = current_tick();
    return t >= d->from && (d->until < 0 || t < d->until);
}

/* The device NVML numbers `index` at this tick, or NULL. */
static struct stub_device *by_index(unsigned int index) {
    for (unsigned int i = 0; i < device_count; i++) {
        if (present(&devices[i]) && index-- == 0) return &devices[i];
    }
    return NULL;
}

/* The scripted error for `function` in the current tick, or NVML_SUCCESS. */
static nvmlReturn_t scripted_error(const char *function) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    long tick = current_tick();
    for (unsigned int i = 0; i < row_count; i++) {
        const struct row *r = &rows[i];
        if (r->kind == ROW_ERROR && r->tick == tick &&
            (!strcmp(r->function, "*") || !strcmp(r->function, function)))
            return (nvmlReturn_t)r->value;
    }
    return NVML_SUCCESS;
}

static int valid(nvmlDevice_t d) {
    return d >= devices && d < devices + device_count;
}

#define ENTER(fn)                                   \
    do {                                            \
        nvmlReturn_t e_ = scripted_error(fn);       \
        if (e_ != NVML_SUCCESS) return e_;          \
    } while (0)

/* ENTER for calls on a device handle: the handle must name a scripted device,
 * which must still be there. */
#define ENTER_DEVICE(fn, device)                                \
    do {                                                        \
        ENTER(fn);                                              \
        if (!valid(device)) return NVML_ERROR_INVALID_ARGUMENT; \
        if (!present(device)) return NVML_ERROR_GPU_IS_LOST;    \
    } while (0)

nvmlReturn_t nvmlInit_v2(void) {
    /* No devices is a valid script: it is how a node without GPUs looks. */
    if (find_script() || load_script()) return NVML_ERROR_UNKNOWN;
    clock_gettime(CLOCK_MONOTONIC, &init_time);
    take_tick();
    initialized = 1;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlShutdown(void) {
    initialized = 0;
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    default: return "Unknown Error (nvml stub)";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    ENTER("nvmlSystemGetDriverVersion");
    if (!version || length < 8) return NVML_ERROR_INVALID_ARGUMENT;
    snprintf(version, length, "550.0.stub");
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (initialized) take_tick();
    ENTER("nvmlDeviceGetCount_v2");
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned int n = 0;
    for (unsigned int i = 0; i < device_count; i++) n += present(&devices[i]);
    *count = n;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    ENTER("nvmlDeviceGetHandleByIndex_v2");
    struct stub_device *d = by_index(index);
    if (!device || !d) return NVML_ERROR_INVALID_ARGUMENT;
    *device = d;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device) {
    if (initialized) take_tick();
    ENTER("nvmlDeviceGetHandleByUUID");
    if (!uuid || !device) return NVML_ERROR_INVALID_ARGUMENT;
    for (unsigned int i = 0; i < device_count; i++) {
        if (present(&devices[i]) && !strcmp(devices[i].uuid, uuid)) {
            *device = &devices[i];
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_NOT_FOUND;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    ENTER_DEVICE("nvmlDeviceGetUUID", device);
    if (!uuid || length <= strlen(device->uuid)) return NVML_ERROR_INVALID_ARGUMENT;
    snprintf(uuid, length, "%s", device->uuid);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    ENTER_DEVICE("nvmlDeviceGetName", device);
    if (!name || length <= strlen(device->name)) return NVML_ERROR_INVALID_ARGUMENT;
    snprintf(name, length, "%s", device->name);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *current, unsigned int *pending) {
    ENTER_DEVICE("nvmlDeviceGetMigMode", device);
    if (!current || !pending) return NVML_ERROR_INVALID_ARGUMENT;
    *current = device->mig;
    *pending = device->mig;
    return NVML_SUCCESS;
}

/* Both process lists follow NVML's protocol: with too small a buffer (or none),
 * set *count to what is needed and answer INSUFFICIENT_SIZE (SUCCESS if 0). */
static nvmlReturn_t running_processes(nvmlDevice_t device, int graphics, unsigned int *count,
                                      nvmlProcessInfo_t *infos) {
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    long tick = current_tick();
    unsigned int n = 0, capacity = infos ? *count : 0;
    for (unsigned int i = 0; i < row_count; i++) {
        const struct row *r = &rows[i];
        if (r->kind != ROW_PROC || r->tick != tick || r->device != device->number || r->graphics != graphics)
            continue;
        if (n < capacity) {
            infos[n].pid = r->pid;
            infos[n].usedGpuMemory = r->value;
            infos[n].gpuInstanceId = r->a;
            infos[n].computeInstanceId = r->a == NO_VALUE ? NO_VALUE : 0;
        }
        n++;
    }
    nvmlReturn_t ret = n > capacity ? NVML_ERROR_INSUFFICIENT_SIZE : NVML_SUCCESS;
    *count = n;
    return ret;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *count,
                                                     nvmlProcessInfo_t *infos) {
    ENTER_DEVICE("nvmlDeviceGetComputeRunningProcesses_v3", device);
    return running_processes(device, 0, count, infos);
}

nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t device, unsigned int *count,
                                                      nvmlProcessInfo_t *infos) {
    ENTER_DEVICE("nvmlDeviceGetGraphicsRunningProcesses_v3", device);
    return running_processes(device, 1, count, infos);
}

nvmlReturn_t nvmlDeviceGetProcessUtilization(nvmlDevice_t device, nvmlProcessUtilizationSample_t *utilization,
                                             unsigned int *count, unsigned long long lastSeenTimeStamp) {
    ENTER_DEVICE("nvmlDeviceGetProcessUtilization", device);
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    if (!device->procutil_supported) return NVML_ERROR_NOT_SUPPORTED;
    long tick = current_tick();
    unsigned int n = 0, capacity = utilization ? *count : 0;
    for (unsigned int i = 0; i < row_count; i++) {
        const struct row *r = &rows[i];
        if (r->kind != ROW_SAMPLE || r->tick > tick || r->device != device->number || r->value <= lastSeenTimeStamp)
            continue;
        if (n < capacity) {
            utilization[n].pid = r->pid;
            utilization[n].timeStamp = r->value;
            utilization[n].smUtil = r->a;
            utilization[n].memUtil = r->b;
            utilization[n].encUtil = 0;
            utilization[n].decUtil = 0;
        }
        n++;
    }
    if (n == 0) return NVML_ERROR_NOT_FOUND;
    nvmlReturn_t ret = n > capacity ? NVML_ERROR_INSUFFICIENT_SIZE : NVML_SUCCESS;
    *count = n;
    return ret;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization) {
    ENTER_DEVICE("nvmlDeviceGetUtilizationRates", device);
    if (!utilization) return NVML_ERROR_INVALID_ARGUMENT;
    long tick = current_tick();
    for (unsigned int i = 0; i < row_count; i++) {
        const struct row *r = &rows[i];
        if (r->kind == ROW_UTIL && r->tick == tick && r->device == device->number) {
            utilization->gpu = r->a;
            utilization->memory = r->b;
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_NOT_SUPPORTED;
}

nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t device, unsigned long long *energy) {
    ENTER_DEVICE("nvmlDeviceGetTotalEnergyConsumption", device);
    if (!energy) return NVML_ERROR_INVALID_ARGUMENT;
    long tick = current_tick();
    for (unsigned int i = 0; i < row_count; i++) {
        const struct row *r = &rows[i];
        if (r->kind == ROW_ENERGY && r->tick == tick && r->device == device->number) {
            *energy = r->value;
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_NOT_SUPPORTED;
}
