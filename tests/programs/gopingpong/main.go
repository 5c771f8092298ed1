// Benchmark: two goroutines hand a token back and forth N times over
// unbuffered channels; prints ns per round trip.
package main

import (
	"fmt"
	"os"
	"strconv"
	"time"
)

func main() {
	n := 10000
	if len(os.Args) > 1 {
		if v, err := strconv.Atoi(os.Args[1]); err == nil {
			n = v
		}
	}
	ping := make(chan int)
	pong := make(chan int)
	go func() {
		for v := range ping {
			pong <- v + 1
		}
		close(pong)
	}()
	start := time.Now()
	v := 0
	for i := 0; i < n; i++ {
		ping <- v
		v = <-pong
	}
	close(ping)
	elapsed := time.Since(start)
	if v != n {
		fmt.Println("lost a hand-off:", v, "of", n)
		os.Exit(1)
	}
	fmt.Printf("round trip ns: %.0f\n", float64(elapsed.Nanoseconds())/float64(n))
}
