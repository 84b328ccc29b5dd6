/* explain --where's C server: one thread per connection reads a command byte, then reads
 * until EOF in leak_conn (never closes: the leak) or in tidy_conn (closes). Built by the
 * tests with gcc -O2 -g and no frame pointers, and again with the debug info stripped.
 * Prints "listening PORT" once it accepts. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static volatile char sink;

__attribute__((noinline)) void leak_conn(int fd)
{
	char buf[256];
	ssize_t n;

	while ((n = read(fd, buf, sizeof(buf))) > 0) /* where: leak */
		sink = buf[0];
	/* EOF: returns with the fd open. */
}

__attribute__((noinline)) void tidy_conn(int fd)
{
	char buf[256];
	ssize_t n;

	while ((n = read(fd, buf, sizeof(buf))) > 0) /* where: tidy */
		sink = buf[0];
	close(fd);
}

static void *handle(void *arg)
{
	int fd = (int)(long)arg;
	char c;

	if (read(fd, &c, 1) != 1) {
		close(fd);
		return NULL;
	}
	if (c == 'L')
		leak_conn(fd);
	else
		tidy_conn(fd);
	return NULL;
}

int main(void)
{
	int l = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a;
	socklen_t len = sizeof(a);
	pthread_attr_t attr;

	memset(&a, 0, sizeof(a));
	a.sin_family = AF_INET;
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof(a)) || listen(l, 1024) ||
	    getsockname(l, (struct sockaddr *)&a, &len)) {
		perror("listen");
		return 1;
	}
	printf("listening %d\n", ntohs(a.sin_port));
	fflush(stdout);
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	for (;;) {
		int fd = accept(l, NULL, NULL);
		pthread_t t;

		if (fd < 0)
			continue;
		if (pthread_create(&t, &attr, handle, (void *)(long)fd))
			close(fd);
	}
}
