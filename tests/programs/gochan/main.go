// Goroutines, channels, a mutex, time.Sleep, a GC-heavy loop and
// GOMAXPROCS(2): run natively and under the minikernel, same output.
package main

import (
	"fmt"
	"runtime"
	"sync"
	"time"
)

type node struct{ next *node; buf []byte }

func main() {
	runtime.GOMAXPROCS(2)
	ch := make(chan int)
	done := make(chan bool)
	go func() {
		s := 0
		for v := range ch {
			s += v
		}
		fmt.Println("sum", s)
		done <- true
	}()
	for i := 0; i < 1000; i++ {
		ch <- i
	}
	close(ch)
	<-done
	var wg sync.WaitGroup
	var mu sync.Mutex
	n := 0
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 1000; i++ {
				mu.Lock()
				n++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	fmt.Println("n", n)
	start := time.Now()
	time.Sleep(20 * time.Millisecond)
	fmt.Println("slept", time.Since(start) >= 20*time.Millisecond)
	var keep *node
	for i := 0; i < 200000; i++ {
		x := &node{buf: make([]byte, 100)}
		if i%1000 == 0 {
			x.next = keep
			keep = x
		}
	}
	c := 0
	for p := keep; p != nil; p = p.next {
		c++
	}
	runtime.GC()
	fmt.Println("kept", c)
}
