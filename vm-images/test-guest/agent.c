/*
 * sluice-agent: the test guest's command agent.
 *
 * Reads one command per line from a serial port (default /dev/ttyS1, which the host binds to
 * a unix socket) and answers each with exactly one line, `ok ...` or `err ...`.
 *
 *   ping [TAG]                   -> ok pong [TAG]
 *   write DISK OFFSET LEN SEED   -> ok wrote LEN      (deterministic pattern, see below)
 *   discard DISK OFFSET LEN      -> ok discarded LEN  (BLKDISCARD)
 *   sync                         -> ok synced         (fsync of every disk, then sync())
 *   sum DISK OFFSET LEN          -> ok SHA256HEX      (of the byte range)
 *   size DISK                    -> ok BYTES
 *   mkfs DISK                    -> ok mkfs           (busybox mke2fs -F /dev/DISK)
 *   mount DISK                   -> ok /mnt/DISK      (ext2, for filesystem-freeze tests)
 *   umount DISK                  -> ok umount
 *   writefile DISK NAME LEN SEED -> ok wrote LEN      (pattern into /mnt/DISK/NAME, fsynced)
 *   poweroff                     -> ok poweroff       (after syncing; then the VM powers off)
 *
 * DISK is a block device name under /dev (e.g. vda). OFFSET and LEN are decimal and must be
 * multiples of 512. The pattern is a pure function of (seed, absolute byte offset): the 8-byte
 * little-endian word at offset o (o % 8 == 0) is splitmix64(seed ^ (o / 8)). The host twin is
 * `testbed::pattern` in tests/src/pattern.rs; keep both in step.
 *
 * Built with `gcc -static -O2`; no dependency beyond libc.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sys/reboot.h>
#include <termios.h>
#include <unistd.h>

#define BUF_SIZE (1u << 20)
#define LINE_MAX_LEN 512

static uint8_t iobuf[BUF_SIZE];
static int port_fd = -1;

/* ---- SHA-256 (FIPS 180-4) ---- */
typedef struct {
	uint32_t h[8];
	uint64_t len;
	uint8_t block[64];
	size_t fill;
} sha256_ctx;

static const uint32_t K[64] = {
	0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
	0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
	0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
	0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
	0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
	0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
	0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
	0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
	0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
	0xc67178f2};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(sha256_ctx *c, const uint8_t *p)
{
	uint32_t w[64], a, b, cc, d, e, f, g, h;
	for (int i = 0; i < 16; i++)
		w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
		       (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
	for (int i = 16; i < 64; i++) {
		uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
		uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
		w[i] = w[i - 16] + s0 + w[i - 7] + s1;
	}
	a = c->h[0], b = c->h[1], cc = c->h[2], d = c->h[3];
	e = c->h[4], f = c->h[5], g = c->h[6], h = c->h[7];
	for (int i = 0; i < 64; i++) {
		uint32_t t1 = h + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) +
			      K[i] + w[i];
		uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & cc) ^ (b & cc));
		h = g, g = f, f = e, e = d + t1, d = cc, cc = b, b = a, a = t1 + t2;
	}
	c->h[0] += a, c->h[1] += b, c->h[2] += cc, c->h[3] += d;
	c->h[4] += e, c->h[5] += f, c->h[6] += g, c->h[7] += h;
}

static void sha256_init(sha256_ctx *c)
{
	static const uint32_t iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
				       0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
	memcpy(c->h, iv, sizeof iv);
	c->len = 0;
	c->fill = 0;
}

static void sha256_update(sha256_ctx *c, const uint8_t *p, size_t n)
{
	c->len += n;
	while (n > 0) {
		size_t take = 64 - c->fill < n ? 64 - c->fill : n;
		memcpy(c->block + c->fill, p, take);
		c->fill += take, p += take, n -= take;
		if (c->fill == 64) {
			sha256_block(c, c->block);
			c->fill = 0;
		}
	}
}

static void sha256_hex(sha256_ctx *c, char out[65])
{
	uint64_t bits = c->len * 8;
	uint8_t pad = 0x80, zero = 0, lenbe[8];
	sha256_update(c, &pad, 1);
	while (c->fill != 56)
		sha256_update(c, &zero, 1);
	for (int i = 0; i < 8; i++)
		lenbe[i] = (uint8_t)(bits >> (56 - 8 * i));
	sha256_update(c, lenbe, 8);
	for (int i = 0; i < 8; i++)
		sprintf(out + 8 * i, "%08x", c->h[i]);
}

/* ---- the pattern ---- */
static uint64_t splitmix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

static void fill_pattern(uint8_t *buf, uint64_t seed, uint64_t offset, size_t len)
{
	for (size_t i = 0; i < len; i += 8) {
		uint64_t v = splitmix64(seed ^ ((offset + i) / 8));
		for (int b = 0; b < 8; b++)
			buf[i + b] = (uint8_t)(v >> (8 * b));
	}
}

/* ---- answers ---- */
static void reply(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void reply(const char *fmt, ...)
{
	char line[LINE_MAX_LEN];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof line - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n > sizeof line - 2)
		n = sizeof line - 2;
	line[n++] = '\n';
	for (int done = 0; done < n;) {
		ssize_t w = write(port_fd, line + done, n - done);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return;
		done += w;
	}
}

/* ---- argument parsing ---- */
static int parse_u64(const char *s, uint64_t *out)
{
	char *end;
	if (s == NULL || !isdigit((unsigned char)*s))
		return -1;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno != 0 || *end != '\0')
		return -1;
	*out = v;
	return 0;
}

/* Opens /dev/DISK; DISK must be a plain lowercase name such as vda. */
static int open_disk(const char *disk, int flags)
{
	char path[64];
	if (disk == NULL || *disk == '\0' || strlen(disk) > 16)
		return -1;
	for (const char *p = disk; *p; p++)
		if (!islower((unsigned char)*p) && !isdigit((unsigned char)*p))
			return -1;
	snprintf(path, sizeof path, "/dev/%s", disk);
	return open(path, flags);
}

static int parse_range(char **argv, uint64_t *off, uint64_t *len)
{
	if (parse_u64(argv[0], off) || parse_u64(argv[1], len))
		return -1;
	if (*off % 512 || *len % 512 || *off + *len < *off)
		return -1;
	return 0;
}

/* ---- commands ---- */

/* Writes the pattern of `seed` for offsets off..off+len through `fd`; 0 or an errno. */
static int write_pattern_fd(int fd, uint64_t off, uint64_t len, uint64_t seed, uint64_t *at)
{
	for (uint64_t done = 0; done < len;) {
		size_t n = len - done > BUF_SIZE ? BUF_SIZE : (size_t)(len - done);
		fill_pattern(iobuf, seed, off + done, n);
		ssize_t w = pwrite(fd, iobuf, n, (off_t)(off + done));
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			*at = off + done;
			return w < 0 ? errno : EIO;
		}
		done += (uint64_t)w;
	}
	return 0;
}

static void cmd_write(char **argv, int argc)
{
	uint64_t off, len, seed, at;
	if (argc != 4 || parse_range(argv + 1, &off, &len) || parse_u64(argv[3], &seed))
		return reply("err usage: write DISK OFFSET LEN SEED (512-aligned)");
	int fd = open_disk(argv[0], O_WRONLY);
	if (fd < 0)
		return reply("err open %s: %s", argv[0], strerror(errno));
	int e = write_pattern_fd(fd, off, len, seed, &at);
	close(fd);
	if (e != 0)
		return reply("err write %s at %llu: %s", argv[0], (unsigned long long)at, strerror(e));
	reply("ok wrote %llu", (unsigned long long)len);
}

static int plain_name(const char *s)
{
	if (s == NULL || *s == '\0' || *s == '.' || strlen(s) > 64)
		return 0;
	for (; *s; s++)
		if (!isalnum((unsigned char)*s) && *s != '.' && *s != '_' && *s != '-')
			return 0;
	return 1;
}

static void cmd_writefile(char **argv, int argc)
{
	uint64_t len, seed, at, zero = 0;
	char path[160];
	if (argc != 4 || !plain_name(argv[0]) || !plain_name(argv[1]) || parse_u64(argv[2], &len) ||
	    parse_u64(argv[3], &seed) || len % 512)
		return reply("err usage: writefile DISK NAME LEN SEED (LEN 512-aligned)");
	snprintf(path, sizeof path, "/mnt/%s/%s", argv[0], argv[1]);
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0)
		return reply("err open %s: %s", path, strerror(errno));
	int e = write_pattern_fd(fd, zero, len, seed, &at);
	if (e == 0 && fsync(fd) != 0)
		e = errno;
	close(fd);
	if (e != 0)
		return reply("err write %s: %s", path, strerror(e));
	reply("ok wrote %llu", (unsigned long long)len);
}

static void cmd_mkfs(char **argv, int argc)
{
	char dev[64];
	int status;
	if (argc != 1 || !plain_name(argv[0]))
		return reply("err usage: mkfs DISK");
	snprintf(dev, sizeof dev, "/dev/%s", argv[0]);
	pid_t pid = fork();
	if (pid == 0) {
		int null = open("/dev/null", O_RDWR);
		dup2(null, 1);
		dup2(null, 2);
		execl("/bin/busybox", "mke2fs", "-F", dev, (char *)NULL);
		_exit(127);
	}
	if (pid < 0 || waitpid(pid, &status, 0) < 0)
		return reply("err mkfs %s: %s", argv[0], strerror(errno));
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
		return reply("err mkfs %s: mke2fs failed", argv[0]);
	reply("ok mkfs");
}

static void cmd_mount(char **argv, int argc, int on)
{
	char dev[64], dir[64];
	if (argc != 1 || !plain_name(argv[0]))
		return reply("err usage: %s DISK", on ? "mount" : "umount");
	snprintf(dev, sizeof dev, "/dev/%s", argv[0]);
	snprintf(dir, sizeof dir, "/mnt/%s", argv[0]);
	if (!on) {
		if (umount2(dir, 0) != 0)
			return reply("err umount %s: %s", dir, strerror(errno));
		return reply("ok umount");
	}
	mkdir("/mnt", 0755);
	mkdir(dir, 0755);
	if (mount(dev, dir, "ext2", 0, NULL) != 0)
		return reply("err mount %s: %s", dev, strerror(errno));
	reply("ok %s", dir);
}

static void cmd_discard(char **argv, int argc)
{
	uint64_t off, len;
	if (argc != 3 || parse_range(argv + 1, &off, &len))
		return reply("err usage: discard DISK OFFSET LEN (512-aligned)");
	int fd = open_disk(argv[0], O_WRONLY);
	if (fd < 0)
		return reply("err open %s: %s", argv[0], strerror(errno));
	uint64_t range[2] = {off, len};
	int rc = ioctl(fd, BLKDISCARD, range);
	int e = errno;
	close(fd);
	if (rc != 0)
		return reply("err discard %s: %s", argv[0], strerror(e));
	reply("ok discarded %llu", (unsigned long long)len);
}

static void cmd_sum(char **argv, int argc)
{
	uint64_t off, len;
	sha256_ctx c;
	char hex[65];
	if (argc != 3 || parse_range(argv + 1, &off, &len))
		return reply("err usage: sum DISK OFFSET LEN (512-aligned)");
	int fd = open_disk(argv[0], O_RDONLY);
	if (fd < 0)
		return reply("err open %s: %s", argv[0], strerror(errno));
	sha256_init(&c);
	for (uint64_t done = 0; done < len;) {
		size_t n = len - done > BUF_SIZE ? BUF_SIZE : (size_t)(len - done);
		ssize_t r = pread(fd, iobuf, n, (off_t)(off + done));
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			int e = r < 0 ? errno : EIO;
			close(fd);
			return reply("err read %s at %llu: %s", argv[0],
				     (unsigned long long)(off + done), r < 0 ? strerror(e) : "end of device");
		}
		sha256_update(&c, iobuf, (size_t)r);
		done += (uint64_t)r;
	}
	close(fd);
	sha256_hex(&c, hex);
	reply("ok %s", hex);
}

static void cmd_size(char **argv, int argc)
{
	uint64_t bytes;
	if (argc != 1)
		return reply("err usage: size DISK");
	int fd = open_disk(argv[0], O_RDONLY);
	if (fd < 0)
		return reply("err open %s: %s", argv[0], strerror(errno));
	int rc = ioctl(fd, BLKGETSIZE64, &bytes);
	close(fd);
	if (rc != 0)
		return reply("err size %s: %s", argv[0], strerror(errno));
	reply("ok %llu", (unsigned long long)bytes);
}

/* fsync every virtio disk so the host sees the writes, then sync() the rest. */
static void sync_all(void)
{
	char name[8];
	for (char c = 'a'; c <= 'z'; c++) {
		snprintf(name, sizeof name, "vd%c", c);
		int fd = open_disk(name, O_RDONLY);
		if (fd < 0)
			continue;
		fsync(fd);
		close(fd);
	}
	sync();
}

static void dispatch(char *line)
{
	char *argv[8];
	int argc = 0;
	for (char *tok = strtok(line, " \t"); tok && argc < 8; tok = strtok(NULL, " \t"))
		argv[argc++] = tok;
	if (argc == 0)
		return;
	if (!strcmp(argv[0], "ping"))
		reply("ok pong%s%s", argc > 1 ? " " : "", argc > 1 ? argv[1] : "");
	else if (!strcmp(argv[0], "write"))
		cmd_write(argv + 1, argc - 1);
	else if (!strcmp(argv[0], "discard"))
		cmd_discard(argv + 1, argc - 1);
	else if (!strcmp(argv[0], "sum"))
		cmd_sum(argv + 1, argc - 1);
	else if (!strcmp(argv[0], "size"))
		cmd_size(argv + 1, argc - 1);
	else if (!strcmp(argv[0], "writefile"))
		cmd_writefile(argv + 1, argc - 1);
	else if (!strcmp(argv[0], "mkfs"))
		cmd_mkfs(argv + 1, argc - 1);
	else if (!strcmp(argv[0], "mount"))
		cmd_mount(argv + 1, argc - 1, 1);
	else if (!strcmp(argv[0], "umount"))
		cmd_mount(argv + 1, argc - 1, 0);
	else if (!strcmp(argv[0], "sync")) {
		sync_all();
		reply("ok synced");
	} else if (!strcmp(argv[0], "poweroff")) {
		sync_all();
		reply("ok poweroff");
		tcdrain(port_fd);
		reboot(RB_POWER_OFF);
		reply("err poweroff: %s", strerror(errno));
	} else
		reply("err unknown command %.32s", argv[0]);
}

static int open_port(const char *path)
{
	struct termios t;
	int fd = open(path, O_RDWR | O_NOCTTY);
	if (fd < 0)
		return -1;
	if (tcgetattr(fd, &t) == 0) {
		cfmakeraw(&t);
		t.c_cflag |= CLOCAL | CREAD;
		t.c_cflag &= ~HUPCL;
		cfsetispeed(&t, B115200);
		cfsetospeed(&t, B115200);
		tcsetattr(fd, TCSANOW, &t);
	}
	tcflush(fd, TCIFLUSH);
	return fd;
}

int main(int argc, char **argv)
{
	const char *path = argc > 1 ? argv[1] : "/dev/ttyS1";
	char line[LINE_MAX_LEN];
	size_t fill = 0;
	int overflow = 0;

	port_fd = open_port(path);
	if (port_fd < 0) {
		fprintf(stderr, "sluice-agent: open %s: %s\n", path, strerror(errno));
		return 1;
	}
	for (;;) {
		char ch;
		ssize_t r = read(port_fd, &ch, 1);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			sleep(1);
			continue;
		}
		if (ch == '\r')
			continue;
		if (ch != '\n') {
			if (fill < sizeof line - 1)
				line[fill++] = ch;
			else
				overflow = 1;
			continue;
		}
		line[fill] = '\0';
		if (overflow)
			reply("err line too long");
		else
			dispatch(line);
		fill = 0;
		overflow = 0;
	}
}
